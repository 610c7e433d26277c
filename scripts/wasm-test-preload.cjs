// Makes Node look enough like workerd for the worker's wasm-bindgen tests (src/wasm_tests.rs,
// run by scripts/test.sh with `NODE_OPTIONS=--require` this file):
// - `cloudflare:sockets` (workerd's TCP socket API), which the worker's wasm-bindgen glue
//   imports, is a stub whose `connect` throws: no test opens a socket.
// - `setTimeout` returns a number, as in workerd and browsers (Node's returns an object, which
//   the `i32` that worker's `Delay` expects cannot hold); the timer does not keep Node running.
const Module = require("node:module");
const load = Module._load;
Module._load = function (request, parent, isMain) {
    if (request === "cloudflare:sockets") {
        return {
            connect() {
                throw new Error("cloudflare:sockets is a stub under Node: no sockets in the wasm-bindgen-test tier");
            },
        };
    }
    return load.call(this, request, parent, isMain);
};
const nodeSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = function (callback, ms, ...args) {
    const timer = nodeSetTimeout(callback, ms, ...args);
    timer.unref();
    // Node's clearTimeout takes this number back once it has been asked for it.
    return Number(timer);
};
