// Runs a wasm32-wasip1 program (e.g. a `cargo test` binary) under Node's WASI, passing its
// arguments and exit status through: `node scripts/wasi-run.mjs prog.wasm [args...]`.
// Used by scripts/test.sh to run the core's tests as WebAssembly with simd128, the way the
// worker runs the SIMD kernel on workerd.
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import { argv, env, exit } from "node:process";

const [program, ...args] = argv.slice(2);
const wasi = new WASI({ version: "preview1", args: [program, ...args], env, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(program));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
exit(wasi.start(instance));
