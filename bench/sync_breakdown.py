#!/usr/bin/env python3
"""Where the time of a bench/sync.sh phase went, from the logs it keeps.

Usage: sync_breakdown.py WRANGLER_SLICE PROVIDER_SLICE PG_LOG_SLICE WALL_SECONDS

WRANGLER_SLICE and PROVIDER_SLICE are the worker's and the provider's output during the phase,
each line prefixed with the epoch time it was read at (bench/sync.sh timestamps them).
PG_LOG_SLICE is the Postgres log of the phase, written with log_min_duration_statement = 0,
log_timezone = UTC and log_line_prefix '%m [%p] %a %q%u@%d ' (psql's own statements, application
name `psql`, are left out: they are the bench's polling, not the worker's work).

Prints a per-batch breakdown (between two consecutive `Batch i of N` lines of one invocation:
the worker asks both models, the provider computes, the answers travel and are decoded, the batch
is written, the next page of new values is listed) and the phase's totals per kind of statement.
"""

import datetime
import re
import statistics
import sys

wr_path, pv_path, pg_path, wall = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])


def stamped(path):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            ts, _, text = line.rstrip("\n").partition(" ")
            try:
                out.append((float(ts), text))
            except ValueError:
                pass
    return out


PG_RECORD = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] (.*?)(LOG|ERROR|WARNING|DETAIL|STATEMENT|HINT|FATAL|NOTICE|CONTEXT):  (.*)$")
DURATION = re.compile(r"^duration: ([0-9.]+) ms  (parse|bind|execute|statement)[^:]*: (.*)$", re.S)


def pg_records(path):
    records = []
    current = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = PG_RECORD.match(line.rstrip("\n"))
            if m:
                if current:
                    records.append(current)
                when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
                current = {"ts": when.timestamp(), "app": m.group(3).split(" ")[0], "level": m.group(4), "text": m.group(5)}
            elif current:
                current["text"] += "\n" + line.rstrip("\n")
    if current:
        records.append(current)
    out = []
    for r in records:
        if r["level"] != "LOG" or r["app"] == "psql":
            continue
        d = DURATION.match(r["text"])
        if d:
            out.append((r["ts"], float(d.group(1)), d.group(2), d.group(3)))
    return out


def category(sql):
    if "INSERT INTO embedding_sync_pending" in sql:
        return "snapshot the pending values (one scan of the source)"
    if "ORDER BY s.h" in sql:
        return "list a page of new values" + ("" if "embedding_sync_pending" in sql else " (scans the source, sorts by hash)")
    if "WITH t AS" in sql and "embedding_cache" in sql:
        return "write a batch (upsert rows and vectors)"
    if "INSERT INTO embedding_cache_sources" in sql and "unnest($3" in sql:
        return "link the batch to the source"
    if "AS total" in sql and "fresh AS MATERIALIZED" in sql:
        return "plan: set-wise counts (the diff query)"
    if "DELETE FROM embedding_cache_sources" in sql or "DELETE FROM embedding_cache c" in sql:
        return "remove stale values"
    if "CREATE EXTENSION IF NOT EXISTS vector" in sql:
        return "ensure schema"
    return "other (transactions, lease, run bookkeeping)"


def ms(values, f):
    return f"{f(values):.0f}" if values else "-"


wr = stamped(wr_path)
pv = stamped(pv_path)
pg = pg_records(pg_path)

# Batches: (time, invocation number) of each `Batch i of N` line.
batches = []
invocation = 0
for ts, text in wr:
    if text.startswith("Batch "):
        batches.append((ts, invocation))
    elif text.startswith("Invocation budget spent") or text.startswith("Sync report") or text.startswith("Resuming run"):
        invocation += 1
answers = [ts for ts, text in pv if "/embeddings" in text and "-> 200" in text]

rows = []
for (t0, inv0), (t1, inv1) in zip(batches, batches[1:]):
    if inv0 != inv1:
        continue
    provider = [a for a in answers if t0 <= a < t1]
    answered = max(provider) if provider else None
    pg_in = [(d, category(sql)) for ts, d, _kind, sql in pg if t0 <= ts < t1]
    write = sum(d for d, c in pg_in if c.startswith("write") or c.startswith("link")) / 1000
    page = sum(d for d, c in pg_in if c.startswith("list")) / 1000
    other = sum(d for d, c in pg_in if not (c.startswith("write") or c.startswith("link") or c.startswith("list"))) / 1000
    total = t1 - t0
    to_provider = (answered - t0) if answered else 0.0
    rest = total - to_provider - write - page - other
    rows.append((total, to_provider, write, page, other, rest))

if rows:
    n = len(rows)
    cols = list(zip(*rows))
    med = [statistics.median(c) * 1000 for c in cols]
    print(f"per batch (median over {n} batch intervals inside one invocation; ms):")
    print(f"  batch to batch                                   {med[0]:8.0f}  (min {min(cols[0]) * 1000:.0f}, max {max(cols[0]) * 1000:.0f})")
    print(f"  worker starts both requests -> provider computed {med[1]:8.0f}  (request upload + provider vector generation)")
    print(f"  Postgres: write the batch (upsert + link)        {med[2]:8.0f}")
    print(f"  Postgres: list the next page of new values       {med[3]:8.0f}")
    print(f"  Postgres: other statements                       {med[4]:8.0f}")
    print(f"  rest: answers to the worker, decode, encode,     {med[5]:8.0f}")
    print("        send to Postgres (worker CPU and transfers)")
else:
    print("per batch: fewer than two batches in one invocation; no per-batch figures")

totals = {}
for _ts, d, _kind, sql in pg:
    c = category(sql)
    totals.setdefault(c, [0.0, 0])
    totals[c][0] += d / 1000
totals_exec = {}
for _ts, d, kind, sql in pg:
    if kind in ("execute", "statement"):
        totals_exec[category(sql)] = totals_exec.get(category(sql), 0) + 1
print(f"phase totals (wall {wall:.1f} s); Postgres time by statement kind (parse + bind + execute):")
for c, (secs, _) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
    print(f"  {secs:8.2f} s  {totals_exec.get(c, 0):5d} x  {c}")
pg_sum = sum(v[0] for v in totals.values())
print(f"  {pg_sum:8.2f} s  in Postgres altogether ({100 * pg_sum / wall if wall else 0:.0f}% of the wall time)")
