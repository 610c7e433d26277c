// Checks that package-lock.json is one `npm ci` installs exactly, on Linux and on macOS.
//
// Usage: node scripts/check-lock.mjs [DIR]   (DIR holds package.json and package-lock.json; default:
// the repository). Runs on any Node >= 18, offline. Exit status 1, with what is wrong, when:
// - the lock's root entry does not list exactly package.json's dependencies (npm ci would refuse);
// - an entry lacks its registry URL (`resolved`) or its sha512 `integrity`;
// - a package some entry depends on optionally (the platform packages of esbuild, workerd, sharp,
//   fsevents, ...) is not in the lock: npm then installs nothing for that platform (the lock
//   written on one OS can drop the others' packages);
// - a package restricted to some OS or CPU (`os`/`cpu`) is not optional: `npm ci` installs it on
//   every platform (a Linux binary on macOS) or refuses to.
import { readFileSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const dir = process.argv[2] ?? join(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
const lock = JSON.parse(readFileSync(join(dir, "package-lock.json"), "utf8"));
const problems = [];

if (lock.lockfileVersion !== 3) {
    problems.push(`lockfileVersion is ${lock.lockfileVersion}, expected 3 (npm 9 or newer)`);
}
const packages = lock.packages ?? {};
const root = packages[""] ?? {};
for (const field of ["dependencies", "devDependencies", "optionalDependencies"]) {
    const want = JSON.stringify(Object.entries(pkg[field] ?? {}).sort());
    const have = JSON.stringify(Object.entries(root[field] ?? {}).sort());
    if (want !== have) {
        problems.push(`the lock's ${field} differ from package.json's: ${have} vs ${want}`);
    }
}

// Where Node would find package `name` required from the package at lock path `from`: the
// nearest node_modules up the tree, as npm lays them out.
function resolve(from, name) {
    let base = from;
    for (;;) {
        const candidate = (base ? base + "/" : "") + "node_modules/" + name;
        if (candidate in packages) return candidate;
        if (!base) return null;
        const cut = base.lastIndexOf("/node_modules/");
        base = cut < 0 ? "" : base.slice(0, cut);
    }
}

for (const [path, entry] of Object.entries(packages)) {
    if (path === "" || entry.link) continue;
    if (!/^https:\/\/registry\.npmjs\.org\/.+\.tgz$/.test(entry.resolved ?? "")) {
        problems.push(`${path}: no registry URL (resolved: ${entry.resolved ?? "missing"})`);
    }
    if (!/^sha512-/.test(entry.integrity ?? "")) {
        problems.push(`${path}: no sha512 integrity`);
    }
    if ((entry.os || entry.cpu) && !entry.optional && !entry.devOptional) {
        problems.push(
            `${path}: only for os ${JSON.stringify(entry.os ?? "any")} cpu ${JSON.stringify(entry.cpu ?? "any")} ` +
                `but not optional (make it an optionalDependency)`,
        );
    }
}
for (const [path, entry] of Object.entries(packages)) {
    for (const name of Object.keys(entry.optionalDependencies ?? {})) {
        if (!resolve(path, name)) {
            problems.push(`${path || "package.json"}: optional dependency ${name} is missing from the lock`);
        }
    }
}

if (problems.length > 0) {
    console.error(`package-lock.json is not one npm ci installs on every platform:`);
    for (const p of problems) console.error(`  - ${p}`);
    console.error(
        "Regenerate it with the repository's .npmrc: rm -rf node_modules package-lock.json && npm install",
    );
    process.exit(1);
}
console.log(`package-lock.json: ${Object.keys(packages).length - 1} packages, all with registry URL and integrity, every platform's optional packages present`);
