// A V8 CPU profile of the worker's isolate under `wrangler dev`, over the Chrome DevTools
// protocol of wrangler's inspector proxy (`--inspector-port`), for bench/throughput.sh's
// BENCH_PROFILE.
//
// Usage:
//   node bench/cpu_profile.mjs start PORT OUT.cpuprofile   starts the profiler and keeps the
//       connection until SIGTERM or SIGINT, then stops it and writes the profile (the file
//       DevTools opens) to OUT.cpuprofile; prints "started" once the profiler runs
//   node bench/cpu_profile.mjs summary OUT.cpuprofile [N]  self time by function, the top N
//       (default 30), and by kind: wasm, JavaScript, garbage collection, (program) = the
//       isolate's thread outside JavaScript and wasm (workerd's own C++: sockets, fetch,
//       streams), (idle)
//
// What it sees is the isolate's thread, sampled every 200 µs: JavaScript and wasm by
// function, the rest of workerd's work on that thread as (program). Work on other threads is
// not in it.
import { readFileSync, writeFileSync } from "node:fs";

const [cmd, ...args] = process.argv.slice(2);

async function start(port, out) {
    // The proxy wants an Origin it allows (Node sends a User-Agent, so none is assumed).
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: { Origin: "http://localhost" } });
    let next = 1;
    const waiting = new Map();
    const call = (method, params = {}) =>
        new Promise((resolve, reject) => {
            const id = next++;
            waiting.set(id, { resolve, reject });
            ws.send(JSON.stringify({ id, method, params }));
        });
    ws.addEventListener("message", (ev) => {
        const msg = JSON.parse(typeof ev.data === "string" ? ev.data : ev.data.toString());
        if (msg.id && waiting.has(msg.id)) {
            const { resolve, reject } = waiting.get(msg.id);
            waiting.delete(msg.id);
            if (msg.error) reject(new Error(`${JSON.stringify(msg.error)}`));
            else resolve(msg.result);
        }
    });
    await new Promise((resolve, reject) => {
        ws.addEventListener("open", resolve, { once: true });
        ws.addEventListener("error", (e) => reject(new Error(`inspector: ${e.message ?? e.type}`)), { once: true });
    });
    await call("Profiler.enable");
    await call("Profiler.setSamplingInterval", { interval: 200 });
    await call("Profiler.start");
    console.log("started");
    const stop = async () => {
        const { profile } = await call("Profiler.stop");
        writeFileSync(out, JSON.stringify(profile));
        ws.close();
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
    // Keep the connection alive.
    setInterval(() => {}, 1 << 30);
}

function summary(file, top) {
    const p = JSON.parse(readFileSync(file, "utf8"));
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    const dt = new Map();
    // timeDeltas[i] is the time before sample i; it is charged to sample i.
    for (let i = 0; i < p.samples.length; i++) {
        const id = p.samples[i];
        dt.set(id, (dt.get(id) ?? 0) + (p.timeDeltas[i] ?? 0));
    }
    const self = new Map();
    const kinds = new Map();
    let total = 0;
    for (const [id, us] of dt) {
        const n = byId.get(id);
        const f = n.callFrame;
        const name = f.functionName || "(anonymous)";
        const where = f.url ? `${f.url.split("/").pop()}` : "";
        const key = `${name} ${where}`.trim();
        self.set(key, (self.get(key) ?? 0) + us);
        let kind;
        if (name === "(idle)") kind = "(idle)";
        else if (name === "(program)") kind = "(program): workerd outside JavaScript and wasm";
        else if (name === "(garbage collector)") kind = "(garbage collector)";
        else if (f.url.startsWith("wasm://") || /^\$?wasm-function|^\$/.test(name) || f.url.endsWith(".wasm")) kind = "wasm";
        else kind = "JavaScript";
        kinds.set(kind, (kinds.get(kind) ?? 0) + us);
        total += us;
    }
    const busy = total - (kinds.get("(idle)") ?? 0);
    const ms = (us) => (us / 1000).toFixed(0).padStart(8);
    const pct = (us) => `${((100 * us) / busy).toFixed(1).padStart(5)}%`;
    console.log(`profile: ${ms(total)} ms sampled, ${ms(busy)} ms not idle`);
    console.log("\nby kind (share of not idle):");
    for (const [k, us] of [...kinds].sort((a, b) => b[1] - a[1])) console.log(`${ms(us)} ms ${k === "(idle)" ? "      " : pct(us)}  ${k}`);
    console.log(`\ntop ${top} functions by self time (share of not idle):`);
    for (const [k, us] of [...self].filter(([k]) => !k.startsWith("(idle)")).sort((a, b) => b[1] - a[1]).slice(0, top)) {
        console.log(`${ms(us)} ms ${pct(us)}  ${k}`);
    }
}

if (cmd === "start" && args.length === 2) {
    await start(args[0], args[1]);
} else if (cmd === "summary" && args.length >= 1) {
    summary(args[0], Number(args[1] ?? 30));
} else {
    console.error("usage: cpu_profile.mjs start PORT OUT.cpuprofile | summary OUT.cpuprofile [N]");
    process.exit(2);
}
