#!/usr/bin/env python3
"""The control matrix (docs/compliance.md) checked against the tests' own results
(`make compliance`), and the report an assessor reads (target/compliance/report.md).

The tests run once: `make test` runs each of its cargo phases through `run` below,
which sets the phase's environment (the storage engine: TOKENVAULT_TEST_STORAGE unset
for `workspace`, `postgres` for `postgres`), keeps the phase's output (libtest's
`test NAME ... ok` lines, and cargo's `Running ... (BINARY)` lines that say whose they
are) in DIR/PHASE.log, and stamps DIR/PHASE.stamp.json with the tree, the engine, the
toolchain, the times and the exit status, also when the phase fails. A test that skips
itself leaves a marker in DIR/skips/PHASE (tests/src/lib.rs, `skipped`), since libtest
reports it `ok`. `report` then reads them; a phase whose log is missing, unfinished or
from another tree or toolchain is run first (`make test-workspace`, `make
test-postgres`), so `make compliance` works from a fresh checkout and reuses `make
test`'s results in CI. A phase that failed still gives its results: the tests it ran
pass or fail their rows, the others "did not run"; the report is always written (an
old one is deleted first).

A named test fails its row when it does not exist in its binary, did not run in a phase
its engine needs, failed (in any of its runs), or skipped itself; a skip marker that
names no test that ran in its phase is a problem of the run. One ignored by default (`#[ignore]`) is run
explicitly (`--ignored --exact`). Manual and not-applicable rows are listed, never
passed. Exit status 1 when any automated row does not pass or the matrix is malformed.

Phases: `workspace` (`cargo test --workspace`: unit tests, and the e2e binary on
RocksDB) and `postgres` (the e2e binary again with TOKENVAULT_TEST_STORAGE=postgres).
An e2e reference's engine picks the phases: rocksdb -> workspace, postgres -> postgres,
both -> both. Other binaries run in the workspace phase whatever their engine.

Standard library only, run by Debian's /usr/bin/python3 (which `make deps` installs).

It also checks that each named test's doc comment names the rows it proves
(`Control: PCI-3.5.1, GDPR-25 (docs/compliance.md).`) and states the attack it
tries on a line of its own starting `Attack:`.

Usage: compliance.py [--dir DIR] run PHASE -- COMMAND... | report [--update FILE]
                                 | check-matrix
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "docs" / "compliance.md"
PHASES = ("workspace", "postgres")
# The storage engine each phase's e2e tests run on (TOKENVAULT_TEST_STORAGE).
ENGINE_OF = {"workspace": "rocksdb", "postgres": "postgres"}
# Files whose edits change no test's result: left out of the tree state, so that
# editing the matrix or refreshing the committed report does not run the tests again.
NOT_TESTED = ("docs/compliance.md", "docs/compliance-report.md")
STATUSES = ("automated", "manual", "n/a")
ENGINES = ("rocksdb", "postgres", "both", "unit")
E2E = "e2e"
COLUMNS = 5  # ID | requirement | how the vault meets it | evidence | status

# A test reference, the only backticked text an automated row's evidence holds:
# `BINARY::PATH::TO::TEST [ENGINE]`; BINARY is the libtest binary's name (`e2e`, or a
# crate's library as `vault_server`).
REF = re.compile(r"^([a-z][a-z0-9_]*)::([A-Za-z0-9_]+(?:::[A-Za-z0-9_]+)*) \[([a-z]+)\]$")
BACKTICKED = re.compile(r"`([^`]*)`")
# cargo: `     Running unittests src/lib.rs (/target/debug/deps/vault_server-0123abcd)`
RUNNING = re.compile(r"^\s*Running (?:unittests )?(\S+) \(((.+)-[0-9a-f]{16}(?:\.exe)?)\)\s*$")
DOCTESTS = re.compile(r"^\s*Doc-tests (\S+)\s*$")
RESULT = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)(?:, .*)?$")


class MatrixError(Exception):
    pass


def git(*args):
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out


def tree_state():
    """An id of the tree the tests see: HEAD, the diff against it and the untracked
    files' contents (ignored files excluded), without the files in NOT_TESTED."""
    head = git("rev-parse", "HEAD")
    if head is None:
        return "not-a-git-checkout"
    digest = hashlib.sha256(head)
    excluded = [f":(exclude){path}" for path in NOT_TESTED]
    digest.update(git("diff", "HEAD", "--binary", "--", ".", *excluded) or b"")
    untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", ".", *excluded)
    for name in sorted((untracked or b"").split(b"\0")):
        if name:
            digest.update(name)
            try:
                digest.update((ROOT / name.decode()).read_bytes())
            except OSError:
                pass
    return digest.hexdigest()


def commit_and_dirty():
    head = git("rev-parse", "HEAD")
    if head is None:
        return "unknown (not a git checkout)", "unknown"
    status = git("status", "--porcelain") or b""
    changed = [line for line in status.decode().splitlines() if line]
    return head.decode().strip(), ("yes, %d files changed" % len(changed)) if changed else "no"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------
# The matrix


def parse_matrix(path=MATRIX):
    """The rows between `<!-- matrix:begin -->` and `<!-- matrix:end -->`: markdown
    table rows of five cells; the header and separator rows of each table skipped."""
    rows, seen, inside = [], set(), False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped == "<!-- matrix:begin -->":
            inside = True
            continue
        if stripped == "<!-- matrix:end -->":
            inside = False
            continue
        if not inside:
            if stripped.startswith("|"):
                raise MatrixError(
                    f"{path.name}:{number}: a table row outside the matrix markers "
                    "(the runner would not check it)"
                )
            continue
        if not stripped.startswith("|"):
            continue
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        where = f"{path.name}:{number}"
        if len(cells) != COLUMNS:
            raise MatrixError(f"{where}: {len(cells)} cells, not {COLUMNS} (no `|` inside a cell)")
        if cells[0] == "ID" or set(cells[0]) <= set("-: "):
            continue
        row_id, requirement, how, evidence, status = cells
        if not re.fullmatch(r"[A-Z][A-Za-z0-9.-]*", row_id):
            raise MatrixError(f"{where}: row id {row_id!r} is not like PCI-3.2.1")
        if row_id in seen:
            raise MatrixError(f"{where}: row {row_id} twice")
        seen.add(row_id)
        if status not in STATUSES:
            raise MatrixError(f"{where}: status {status!r} is none of {', '.join(STATUSES)}")
        if not requirement or not how or not evidence:
            raise MatrixError(f"{where}: row {row_id} has an empty cell")
        refs = []
        for text in BACKTICKED.findall(evidence):
            match = REF.match(text)
            if status == "automated":
                if not match:
                    raise MatrixError(
                        f"{where}: {text!r} in an automated row is not a test reference "
                        "`BINARY::PATH [ENGINE]`"
                    )
            elif match:
                raise MatrixError(
                    f"{where}: a {status} row names a test ({text}); only automated rows do"
                )
            if match:
                binary, test, engine = match.groups()
                if engine not in ENGINES:
                    raise MatrixError(f"{where}: engine {engine!r} is none of {', '.join(ENGINES)}")
                if binary == E2E and engine == "unit":
                    raise MatrixError(f"{where}: an e2e test runs on rocksdb, postgres or both")
                refs.append((binary, test, engine))
        if status == "automated" and not refs:
            raise MatrixError(f"{where}: automated row {row_id} names no test")
        rows.append(
            {
                "id": row_id,
                "requirement": requirement,
                "how": how,
                "evidence": evidence,
                "status": status,
                "refs": refs,
            }
        )
    if inside:
        raise MatrixError(f"{path.name}: `<!-- matrix:begin -->` without its end")
    if not rows:
        raise MatrixError(f"{path.name}: no rows between the matrix markers")
    return rows


def crate_dirs():
    """Library name (as libtest binaries are named) -> the crate's directory."""
    dirs = {}
    for manifest in sorted(ROOT.glob("**/Cargo.toml")):
        if "target" in manifest.relative_to(ROOT).parts or manifest.parent == ROOT:
            continue
        text = manifest.read_text()
        package = re.search(r'(?ms)^\[package\].*?^name = "([^"]+)"', text)
        lib = re.search(r'(?ms)^\[lib\].*?^name = "([^"]+)"', text)
        if package:
            name = (lib.group(1) if lib else package.group(1)).replace("-", "_")
            dirs.setdefault(name, manifest.parent)
    return dirs


def test_source(binary, test, dirs):
    """(file, line index of `fn NAME(`) of a referenced test, or None."""
    *modules, name = test.split("::")
    if binary == E2E:
        candidates = [ROOT / "tests" / "e2e" / f"{modules[0]}.rs"] if modules else []
    elif binary in dirs:
        candidates = sorted((dirs[binary] / "src").glob("**/*.rs"))
    else:
        return None
    pattern = re.compile(r"^\s*(?:pub )?(?:async )?fn " + re.escape(name) + r"\b")
    found = []
    for path in candidates:
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        for index, line in enumerate(lines):
            if pattern.match(line):
                found.append((path, index, lines))
    if len(found) > 1:
        # Prefer the file whose path spells the module path.
        parts = [m for m in modules if m not in ("tests",)]
        found.sort(key=lambda f: -sum(part in f[0].parts or f[0].stem == part for part in parts))
    return found[0] if found else None


def doc_comment(lines, index):
    """The `///` lines above line `index`, across attributes, one string each."""
    docs, i = [], index - 1
    while i >= 0:
        stripped = lines[i].strip()
        if stripped.startswith("///"):
            docs.insert(0, stripped[3:].strip())
        elif not stripped.startswith("#[") and not stripped.startswith("//"):
            break
        i -= 1
    return docs


def check_doc_comments(rows):
    """Each named test's doc comment says which rows it proves (`Control: ID, ...`)
    and what attack it tries: the matrix and the tests cannot drift apart."""
    by_test = {}
    for row in rows:
        for binary, test, _ in row["refs"]:
            by_test.setdefault((binary, test), set()).add(row["id"])
    dirs, problems = crate_dirs(), []
    for (binary, test), ids in sorted(by_test.items()):
        source = test_source(binary, test, dirs)
        if source is None:
            problems.append(f"{binary}::{test}: no source found for it")
            continue
        path, index, lines = source
        doc_lines = doc_comment(lines, index)
        doc = " ".join(doc_lines)
        where = f"{path.relative_to(ROOT)}:{index + 1}"
        control = re.search(r"Control: ([A-Za-z0-9., -]+?) \(docs/compliance\.md\)", doc)
        named = set(re.findall(r"[A-Z][A-Za-z0-9.-]*[A-Za-z0-9]", control.group(1))) if control else set()
        if not control:
            problems.append(f"{where} {test}: its doc comment has no `Control: ID, ... (docs/compliance.md)`")
        elif named != ids:
            problems.append(
                f"{where} {test}: doc says Control: {', '.join(sorted(named))}; "
                f"the matrix has {', '.join(sorted(ids))}"
            )
        if not any(line.startswith("Attack: ") for line in doc_lines):
            problems.append(f"{where} {test}: its doc comment has no line starting `Attack: `")
    return problems


def phases_of(binary, engine):
    if binary != E2E:
        return ("workspace",)
    return {"rocksdb": ("workspace",), "postgres": ("postgres",), "both": PHASES}[engine]


# ---------------------------------------------------------------------------------
# The test runs


class Phase:
    """What one phase's log and skip markers say."""

    def __init__(self, directory, name):
        self.name = name
        self.log = directory / f"{name}.log"
        self.stamp = directory / f"{name}.stamp.json"
        self.skips = directory / "skips" / name
        self.results = {}  # (binary, test) -> ok | FAILED | ignored
        self.binaries = {}  # binary -> paths of its test executables (a lib and a bin may share a name)

    def info(self):
        try:
            return json.loads(self.stamp.read_text())
        except (OSError, ValueError):
            return {}

    def fresh(self, state, toolchain):
        info = self.info()
        return (
            self.log.exists()
            and info.get("tree") == state
            and info.get("toolchain") == toolchain
            and info.get("engine") == ENGINE_OF[self.name]
            and "finished" in info
        )

    def read(self, log=None):
        binary = None
        for line in (log or self.log).read_text(errors="replace").splitlines():
            running = RUNNING.match(line)
            if running:
                binary = Path(running.group(3)).name
                self.binaries.setdefault(binary, set()).add(running.group(2))
                continue
            doctests = DOCTESTS.match(line)
            if doctests:
                binary = "doctests_" + doctests.group(1)
                continue
            result = RESULT.match(line)
            if result and binary is not None:
                key = (binary, result.group(1))
                previous, outcome = self.results.get(key), result.group(2)
                # A failure in any run sticks; a test run again explicitly (ignored by
                # default) overrides `ignored`, never the other way round.
                if previous == "FAILED" or (previous == "ok" and outcome == "ignored"):
                    continue
                self.results[key] = outcome

    def skip_markers(self):
        if not self.skips.is_dir():
            return {}
        return {p.name: p.read_text().strip() for p in self.skips.iterdir()}


def listed_tests(executable, cache={}):
    """Every test (ignored ones too) of a test executable, from its `--list`."""
    if executable not in cache:
        try:
            out = subprocess.run(
                [executable, "--list", "--format", "terse", "--ignored"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            ignored = {line[: -len(": test")] for line in out.splitlines() if line.endswith(": test")}
            out = subprocess.run(
                [executable, "--list", "--format", "terse"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            every = {line[: -len(": test")] for line in out.splitlines() if line.endswith(": test")}
            cache[executable] = every | ignored
        except (OSError, subprocess.CalledProcessError):
            cache[executable] = None
    return cache[executable]


def cargo_target_args(binary):
    """`cargo test` arguments that select the test binary `binary`."""
    if binary == E2E:
        return ["-p", "integration-tests", "--test", E2E]
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--offline", "--no-deps", "--format-version", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    for package in meta["packages"]:
        for target in package["targets"]:
            if target["name"].replace("-", "_") != binary:
                continue
            if "lib" in target["kind"] or "rlib" in target["kind"]:
                return ["-p", package["name"], "--lib"]
            if "bin" in target["kind"]:
                return ["-p", package["name"], "--bin", target["name"]]
            if "test" in target["kind"]:
                return ["-p", package["name"], "--test", target["name"]]
    raise MatrixError(f"no cargo target builds the test binary {binary}")


def run_ignored(directory, phase, binary, tests):
    """Runs tests ignored by default explicitly, in `phase`'s environment; their
    output goes to DIR/PHASE-ignored.log, which `Phase.read` then reads."""
    log = directory / f"{phase.name}-ignored.log"
    env = phase_env(phase)
    with log.open("a") as out:
        for test in tests:
            command = ["cargo", "test", "--locked", *cargo_target_args(binary), "--", "--ignored", "--exact", test]
            print("==> " + " ".join(command), flush=True)
            proc = subprocess.run(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            sys.stdout.write(proc.stdout)
            out.write(proc.stdout)
    phase.read(log)


# ---------------------------------------------------------------------------------
# Commands


def toolchain():
    """`rustc --version` and `cargo --version` as the tests' toolchain (rust-toolchain.toml
    applies in ROOT)."""
    versions = []
    for tool in ("rustc", "cargo"):
        try:
            versions.append(
                subprocess.run(
                    [tool, "--version"], cwd=ROOT, capture_output=True, text=True, check=True
                ).stdout.strip()
            )
        except (OSError, subprocess.CalledProcessError):
            versions.append(f"{tool} unknown")
    return "; ".join(versions)


def phase_env(phase):
    """The environment of a phase's tests: its engine and its skip marker directory,
    whatever the caller's environment says."""
    env = dict(os.environ, TOKENVAULT_TEST_SKIP_DIR=str(phase.skips.resolve()))
    if ENGINE_OF[phase.name] == "postgres":
        env["TOKENVAULT_TEST_STORAGE"] = "postgres"
    else:
        env.pop("TOKENVAULT_TEST_STORAGE", None)
    return env


def run_phase(directory, name, command):
    """Runs one phase's `command` (a cargo test) in the phase's environment, its output
    to the terminal and DIR/PHASE.log, and stamps the run, also when it fails. Returns
    the command's exit status."""
    phase = Phase(directory, name)
    directory.mkdir(parents=True, exist_ok=True)
    for path in (phase.log, directory / f"{name}-ignored.log", phase.stamp):
        path.unlink(missing_ok=True)
    if phase.skips.is_dir():
        for marker in phase.skips.iterdir():
            marker.unlink()
    info = {
        "tree": tree_state(),
        "engine": ENGINE_OF[name],
        "toolchain": toolchain(),
        "command": " ".join(command),
        "started": utc_now(),
    }
    phase.stamp.write_text(json.dumps(info))
    status = 127
    try:
        with phase.log.open("w") as log:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=phase_env(phase),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            status = proc.wait()
    except OSError as error:
        print(f"compliance: cannot run {command[0]}: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        status = 130
    finally:
        info["finished"] = utc_now()
        info["exit"] = status
        phase.stamp.write_text(json.dumps(info))
    return status


def check_row(row, phases, directory, problems):
    """Each reference's outcome, as (text, passed)."""
    outcomes = []
    for binary, test, engine in row["refs"]:
        for name in phases_of(binary, engine):
            phase = phases[name]
            result = phase.results.get((binary, test))
            executables = phase.binaries.get(binary)
            listings = [listed_tests(path) for path in sorted(executables or ())]
            listed = None if None in listings or not listings else set().union(*listings)
            marker = phase.skip_markers().get(test) if binary == E2E else None
            if marker is not None:
                outcome, passed = f"skipped itself: {marker}", False
            elif result == "ok":
                outcome, passed = "ok", True
            elif result == "FAILED":
                outcome, passed = "FAILED", False
            elif result == "ignored":
                outcome, passed = "ignored (not run)", False
            elif not executables:
                outcome, passed = f"binary {binary} did not run", False
            elif listed is not None and test not in listed:
                outcome, passed = "no such test", False
            else:
                outcome, passed = "did not run", False
            outcomes.append((f"`{binary}::{test}` on {name}: {outcome}", passed))
            if not passed:
                problems.append(f"{row['id']}: {binary}::{test} ({name}): {outcome}")
    return outcomes


def report(directory, update):
    (directory / "report.md").unlink(missing_ok=True)
    rows = parse_matrix()
    state, tools = tree_state(), toolchain()
    phases = {name: Phase(directory, name) for name in PHASES}
    needed = {n for row in rows for b, _, e in row["refs"] for n in phases_of(b, e)}
    problems = []
    for name in PHASES:
        if name in needed and not phases[name].fresh(state, tools):
            target = {"workspace": "test-workspace", "postgres": "test-postgres"}[name]
            print(
                f"==> no finished `{name}` test run of this tree and toolchain in {directory}: "
                f"make {target}",
                flush=True,
            )
            # Its failures are read from its log below, not raised here.
            subprocess.run(["make", "--no-print-directory", target], cwd=ROOT)
            if not phases[name].fresh(state, tools):
                problems.append(f"`make {target}` left no finished run of this tree")
    for name in PHASES:
        if name in needed:
            if phases[name].log.exists():
                phases[name].read()
            exit_status = phases[name].info().get("exit")
            if exit_status != 0:
                problems.append(f"the `{name}` phase exited with status {exit_status}")
            log = directory / f"{name}-ignored.log"
            if log.exists():
                phases[name].read(log)
    # Tests the matrix names that their phase left ignored: run them explicitly.
    for name in PHASES:
        wanted = {}
        for row in rows:
            for binary, test, engine in row["refs"]:
                if name in phases_of(binary, engine) and phases[name].results.get((binary, test)) == "ignored":
                    wanted.setdefault(binary, set()).add(test)
        for binary, tests in sorted(wanted.items()):
            run_ignored(directory, phases[name], binary, sorted(tests))

    problems += check_doc_comments(rows)
    for name in sorted(needed):
        ran = {test for (_, test), outcome in phases[name].results.items() if outcome != "ignored"}
        for marker, why in sorted(phases[name].skip_markers().items()):
            if marker not in ran:
                problems.append(
                    f"a skip marker of the {name} phase names no test that ran there: "
                    f"{marker} ({why})"
                )
    lines = []
    counts = {"pass": 0, "fail": 0, "manual": 0, "n/a": 0}
    for row in rows:
        if row["status"] == "automated":
            outcomes = check_row(row, phases, directory, problems)
            passed = all(ok for _, ok in outcomes)
            result = "PASS" if passed else "FAIL"
            counts["pass" if passed else "fail"] += 1
            evidence = "<br>".join(text for text, _ in outcomes)
        elif row["status"] == "manual":
            result = "MANUAL (never passed here; the procedure is its evidence)"
            counts["manual"] += 1
            evidence = row["evidence"]
        else:
            result = "NOT APPLICABLE (the reason is its evidence)"
            counts["n/a"] += 1
            evidence = row["evidence"]
        lines.append(f"| {row['id']} | {row['requirement']} | {result} | {evidence} |")

    commit, dirty = commit_and_dirty()
    runs = []
    for name in PHASES:
        if name in needed:
            info = phases[name].info()
            runs.append(
                f"`{name}` on {info.get('engine', '?')}, {info.get('started', '?')} to "
                f"{info.get('finished', '?')}, exit status {info.get('exit', '?')}"
            )
    out = [
        "# Compliance report",
        "",
        "Generated by `make compliance` (scripts/compliance.py) from docs/compliance.md and",
        "the test runs below. Manual and not-applicable rows are never counted as passing.",
        "",
        f"- Date: {utc_now()}",
        f"- Commit: {commit}",
        f"- Uncommitted changes: {dirty}",
        f"- Test runs of this tree: {'; '.join(runs) or 'none needed'}",
        f"- Toolchain: {tools}",
        f"- Automated rows: {counts['pass']} pass, {counts['fail']} fail; manual rows: "
        f"{counts['manual']}; not applicable: {counts['n/a']}",
        "",
        "| ID | Requirement | Result | Evidence |",
        "|---|---|---|---|",
        *lines,
        "",
    ]
    if problems:
        out += ["## Problems", "", *[f"- {p}" for p in problems], ""]
    text = "\n".join(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text(text)
    if update:
        Path(update).write_text(text)
    print(
        f"compliance: {counts['pass']} automated rows pass, {counts['fail']} fail; "
        f"{counts['manual']} manual, {counts['n/a']} not applicable "
        f"(report: {directory / 'report.md'})"
    )
    for problem in problems[:30]:
        print(f"compliance: FAIL {problem}", file=sys.stderr)
    if len(problems) > 30:
        print(f"compliance: ... and {len(problems) - 30} more in the report", file=sys.stderr)
    return 1 if problems else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(ROOT / "target" / "compliance"))
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one test phase's command, logged and stamped")
    run.add_argument("phase", choices=PHASES)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND...")
    rep = sub.add_parser("report")
    rep.add_argument("--update", metavar="FILE", help="also write the report to FILE")
    sub.add_parser("check-matrix")
    args = parser.parse_args()
    directory = Path(args.dir).resolve()
    try:
        if args.command == "run":
            command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not command:
                parser.error("run PHASE -- COMMAND...")
            return run_phase(directory, args.phase, command)
        elif args.command == "check-matrix":
            rows = parse_matrix()
            problems = check_doc_comments(rows)
            for problem in problems:
                print(f"compliance: {problem}", file=sys.stderr)
            print(f"compliance: {len(rows)} rows, {sum(len(r['refs']) for r in rows)} test references")
            return 1 if problems else 0
        else:
            return report(directory, args.update)
    except MatrixError as error:
        print(f"compliance: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001: a message, never a traceback, is the output
        print(f"compliance: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
