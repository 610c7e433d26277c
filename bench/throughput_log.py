#!/usr/bin/env python3
"""Reads the local provider's request log (GET /_admin/requests, JSON) of one initial sync and
prints its figures as one JSON object, for bench/throughput.sh.

Usage: throughput_log.py LOG.json T_START T_END N [RPM TPM]

T_START / T_END: the sync's wall-clock span (epoch seconds, the first trigger to the run
finished); N: values in the source. RPM / TPM: the provider's limits per key and model (absent
or 0: no rate limit).

Figures:
- requests, 429s and their share among requests, per model and in all;
- tokens (of the answered requests) and requests per minute over the sync's duration, per
  model, and the share of the limit that binds (the larger of tokens/min over TPM and
  requests/min over RPM, per model; the figure is the mean over the models). Two shares: of
  limit x duration, and of what the buckets could hand out in that time (they start full:
  limit x (duration + 1 min));
- requests in flight (both models) over the sync's span, from each request's start and end
  times: max and time-weighted mean;
- the lowest share of the token bucket left after a request, per model (how close the run came
  to the limit);
- each value sent once per model: inputs of answered requests per model, total and distinct.
"""
import json
import sys


def main():
    log = json.load(open(sys.argv[1]))
    t_start, t_end, n = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    rpm = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    tpm = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    duration = t_end - t_start
    minutes = duration / 60.0
    models = {}
    for r in log:
        m = models.setdefault(r["model"], {"requests": 0, "429": 0, "tokens": 0, "inputs": [], "low": None})
        m["requests"] += 1
        snap = r.get("rateLimit")
        if snap:
            left = snap["remainingTokens"] / snap["limitTokens"]
            m["low"] = left if m["low"] is None else min(m["low"], left)
        if r["status"] == 429:
            m["429"] += 1
        elif r["status"] == 200:
            m["tokens"] += r.get("tokens") or 0
            m["inputs"].extend(r["inputs"])
    out = {"duration_s": round(duration, 2), "values_per_s": round(n / duration, 1), "models": {}}
    shares, bucket_shares = [], []
    for name, m in sorted(models.items()):
        short = name.replace("text-embedding-3-", "")
        fig = {
            "requests": m["requests"],
            "429": m["429"],
            "tokens": m["tokens"],
            "tokens_per_min": round(m["tokens"] / minutes),
            "requests_per_min": round(m["requests"] / minutes, 1),
            "inputs": len(m["inputs"]),
            "distinct_inputs": len(set(m["inputs"])),
        }
        if m["low"] is not None:
            fig["lowest_tokens_left"] = round(m["low"], 3)
        if rpm and tpm:
            tok_share = m["tokens"] / (tpm * minutes)
            req_share = m["requests"] / (rpm * minutes)
            fig["binding"] = "tokens" if tok_share >= req_share else "requests"
            share = max(tok_share, req_share)
            fig["share_of_limit"] = round(share, 3)
            bucket = max(m["tokens"] / (tpm * (minutes + 1)), m["requests"] / (rpm * (minutes + 1)))
            fig["share_of_buckets"] = round(bucket, 3)
            shares.append(share)
            bucket_shares.append(bucket)
        out["models"][short] = fig
    total = sum(m["requests"] for m in models.values())
    rejected = sum(m["429"] for m in models.values())
    out["requests"] = total
    out["429"] = rejected
    out["share_429"] = round(rejected / total, 4) if total else 0.0
    if shares:
        out["share_of_limit"] = round(sum(shares) / len(shares), 3)
        out["share_of_buckets"] = round(sum(bucket_shares) / len(bucket_shares), 3)
    out["sent_once"] = all(
        m["inputs"] and len(m["inputs"]) == len(set(m["inputs"])) == n for m in models.values()
    ) and len(models) == 2

    # Requests in flight over [t_start, t_end]: +1 at each start, -1 at each end.
    events = []
    for r in log:
        start = r["startedMs"] / 1000.0
        end = (r.get("endedMs") or r["startedMs"]) / 1000.0
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    level, peak, area = 0, 0, 0.0
    last = t_start
    for t, d in events:
        t_clamped = min(max(t, t_start), t_end)
        area += level * (t_clamped - last)
        last = t_clamped
        level += d
        peak = max(peak, level)
    area += level * (t_end - last)
    out["in_flight_max"] = peak
    out["in_flight_mean"] = round(area / duration, 2) if duration > 0 else 0.0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
