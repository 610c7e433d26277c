#!/usr/bin/env python3
"""A counting TCP proxy for the Postgres wire protocol, used by bench/sync.sh.

Usage: pgwire_count.py TARGET_PORT OUT_FILE

Listens on a free port on 127.0.0.1 (the first stdout line is `listening on PORT`), forwards
every connection to 127.0.0.1:TARGET_PORT and, when a connection closes, appends one JSON line to
OUT_FILE describing it:

  {"conn": 1, "dataRows": 3, "bytesToClient": 2048, "bytesToServer": 4096,
   "statements": [{"sql": "SELECT ...", "rows": 1, "tag": "SELECT 1"}, ...],
   "prepared": ["full text of each statement the client prepared", ...]}

`dataRows` counts the DataRow ('D') messages the server sent: exactly the rows the client (the
worker) received, whatever statements it ran. `statements` pairs each CommandComplete with the
SQL the client executed (Parse + Bind + Execute, or a simple Query), best effort.

It only exists to measure "rows sent to the worker" when the Postgres build has no
pg_stat_statements; it is not meant for heavy traffic (pure Python, parses every message).
"""

import asyncio
import itertools
import json
import struct
import sys

TARGET_PORT = int(sys.argv[1])
OUT_FILE = sys.argv[2]
SSL_REQUEST = 80877103
GSS_REQUEST = 80877104
conn_ids = itertools.count(1)


def short(sql):
    return " ".join(sql.split())[:160]


class Conn:
    def __init__(self):
        self.id = next(conn_ids)
        self.data_rows = 0
        self.rows_since_complete = 0
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        self.prepared = {}  # statement name -> SQL
        self.prepared_all = []  # full text of every statement prepared, in order
        self.bound = None  # SQL of the last Bind
        self.expected = []  # FIFO of [sql, simple?] awaiting CommandComplete
        self.syncs = []  # FIFO of what each awaited ReadyForQuery ends: "sync" or "query"
        self.statements = []
        self.single_byte_replies = 0  # answers to SSLRequest/GSSENCRequest: one untyped byte

    # Client -> server.
    def client_message(self, kind, body):
        if kind == b"P":
            name, rest = body.split(b"\0", 1)
            sql = rest.split(b"\0", 1)[0]
            self.prepared[name] = sql.decode("utf-8", "replace")
            self.prepared_all.append(self.prepared[name])
        elif kind == b"B":
            _portal, rest = body.split(b"\0", 1)
            stmt = rest.split(b"\0", 1)[0]
            self.bound = self.prepared.get(stmt, "?")
        elif kind == b"E":
            self.expected.append([self.bound or "?", False])
        elif kind == b"S":
            self.syncs.append("sync")
        elif kind == b"Q":
            self.expected.append([body.rstrip(b"\0").decode("utf-8", "replace"), True])
            self.syncs.append("query")

    # Server -> client.
    def server_message(self, kind, body):
        if kind == b"D":
            self.data_rows += 1
            self.rows_since_complete += 1
        elif kind in (b"C", b"I", b"E"):
            if kind == b"C":
                tag = body.rstrip(b"\0").decode("utf-8", "replace")
            elif kind == b"I":
                tag = "EMPTY"
            else:
                tag = "ERROR"
            sql = "?"
            if self.expected:
                sql, simple = self.expected[0]
                if not simple:
                    self.expected.pop(0)
            if kind != b"E" or self.rows_since_complete or sql != "?":
                self.statements.append({"sql": short(sql), "rows": self.rows_since_complete, "tag": tag})
            self.rows_since_complete = 0
        elif kind == b"Z":
            # A simple query is over at its ReadyForQuery (it may have run several statements);
            # the client may already have sent the next request, so only that one is popped.
            ended = self.syncs.pop(0) if self.syncs else None
            if ended == "query":
                for i, (_sql, simple) in enumerate(self.expected):
                    if simple:
                        del self.expected[i]
                        break

    def summary(self):
        return {
            "conn": self.id,
            "dataRows": self.data_rows,
            "bytesToClient": self.bytes_to_client,
            "bytesToServer": self.bytes_to_server,
            "statements": self.statements,
            "prepared": self.prepared_all,
        }


async def pump(reader, writer, conn, from_client):
    buf = b""
    startup = from_client  # the client's first message(s) carry no type byte
    try:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            writer.write(chunk)
            if from_client:
                conn.bytes_to_server += len(chunk)
            else:
                conn.bytes_to_client += len(chunk)
            buf += chunk
            while True:
                if from_client and startup:
                    if len(buf) < 8:
                        break
                    (length,) = struct.unpack("!I", buf[:4])
                    if len(buf) < length:
                        break
                    (code,) = struct.unpack("!I", buf[4:8])
                    buf = buf[length:]
                    if code in (SSL_REQUEST, GSS_REQUEST):
                        conn.single_byte_replies += 1
                    else:
                        startup = False
                    continue
                if not from_client and conn.single_byte_replies:
                    if not buf:
                        break
                    conn.single_byte_replies -= 1
                    buf = buf[1:]
                    continue
                if len(buf) < 5:
                    break
                (length,) = struct.unpack("!I", buf[1:5])
                if len(buf) < 1 + length:
                    break
                kind, body = buf[:1], buf[5 : 1 + length]
                buf = buf[1 + length :]
                if from_client:
                    conn.client_message(kind, body)
                else:
                    conn.server_message(kind, body)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - closing a broken socket
            pass


async def handle(client_reader, client_writer):
    conn = Conn()
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", TARGET_PORT)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        pump(client_reader, server_writer, conn, True),
        pump(server_reader, client_writer, conn, False),
    )
    with open(OUT_FILE, "a", encoding="utf-8") as out:
        out.write(json.dumps(conn.summary()) + "\n")


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
