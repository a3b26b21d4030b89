"""What root runs: the script and each ``--python`` file, as root until `milter main`. A file, or
a directory on the way to it, that another user owns or may write is refused at start (exit 1,
nothing of it run), at a reload (the old script serves on) and by ``check`` and ``try`` run as
root; a developer's own account is not checked. All through the command as an admin runs it."""

from __future__ import annotations

import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib.util import cache_from_source
from pathlib import Path

import pytest

from support.tclrun import _pytclmilter_command, child_env, tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs as root, with files of another user")

NOBODY = 65534

STAMP = r"""puts "script ran"
package require TclMilter
proc eom {ctx} { $ctx addheader X-Stamp {STAMP}; return SMFIS_CONTINUE }
milter register eom eom
milter main
"""

HOOKS = 'print("hooks ran", flush=True)\n\ndef setup(milter):\n    pass\n'

TCP = "inet:0@127.0.0.1"

THREAD = Path("/usr/lib/tcltk/x86_64-linux-gnu/thread2.8.8/libthread2.8.8.so")
needs_thread = pytest.mark.skipif(not THREAD.exists(), reason="needs Debian's tcl-thread")


def stamping(stamp: str) -> str:
    return STAMP.replace("{STAMP}", stamp)


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """An admin's directory, /etc/milter-like: root's, 0755, on a path of root's (pytest's own
    under the sticky /tmp). Holds the script and its --python file, 0644."""
    home = tmp_path / "etc" / "milter"
    home.mkdir(parents=True)
    for d in (tmp_path, tmp_path / "etc", home):
        d.chmod(0o755)
    (home / "filter.tcl").write_text(stamping("A"))
    (home / "hooks.py").write_text(HOOKS)
    return home


def stamps(run) -> list[bytes]:
    with run.mta() as mta:
        mta.negotiate()
        return [p[1] for p in mta.message()["eom"] if p[0] == "h"]


def make_unsafe(etc: Path, kind: str) -> tuple[Path, Path, str]:
    """The script and the --python file to run, and the reason given for refusing them."""
    script, hooks = etc / "filter.tcl", etc / "hooks.py"
    if kind == "script owned by another user":
        os.chown(script, NOBODY, -1)
        return script, hooks, (f"{script} as root: {script} is owned by uid {NOBODY}, not root: that user could "
                               f"change what runs as root (chown root {script})")
    if kind == "script writable by its group":
        script.chmod(0o664)
        return script, hooks, (f"{script} as root: {script} is writable by its group, who could change what "
                               f"runs as root (chmod g-w {script})")
    if kind == "directory writable by others":
        etc.chmod(0o777)
        return script, hooks, (f"{script} as root: {etc} is writable by its group and others, who could change "
                               f"what runs as root (chmod go-w {etc})")
    if kind == "directory above owned by another user":
        os.chown(etc.parent, NOBODY, -1)
        return script, hooks, (f"{script} as root: {etc.parent} is owned by uid {NOBODY}, not root: that user "
                               f"could change what runs as root (chown root {etc.parent})")
    if kind == "python file owned by another user":
        os.chown(hooks, NOBODY, -1)
        return script, hooks, (f"--python {hooks} as root: {hooks} is owned by uid {NOBODY}, not root: that "
                               f"user could change what runs as root (chown root {hooks})")
    if kind == "another user's directory in a sticky one":  # /tmp/x, made by that user
        sticky = etc / "tmp"
        sticky.mkdir(mode=0o1777)
        sticky.chmod(0o1777)
        theirs = sticky / "x"
        theirs.mkdir()
        script = theirs / "filter.tcl"
        script.write_text(stamping("A"))
        os.chown(theirs, NOBODY, -1)
        return script, hooks, (f"{script} as root: {theirs} is owned by uid {NOBODY}, not root: that user "
                               f"could change what runs as root (chown root {theirs})")
    if kind == "root's file linked into a sticky directory":  # by another user, fs.protected_hardlinks 0
        sticky = etc / "tmp"
        sticky.mkdir()
        sticky.chmod(0o1777)
        link = sticky / "filter.tcl"
        os.link(script, link)
        return link, hooks, (f"{link} as root: {link} has 2 links and is in a directory others may write, where "
                             "another user may have linked any file of root's; refusing it (use the file from a "
                             "directory only root may write)")
    assert kind == "another user's link in a sticky directory"
    sticky = etc / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "filter.tcl"
    link.symlink_to(script)  # to root's own safe file: but that user could make it lead anywhere
    os.lchown(link, NOBODY, -1)
    return link, hooks, (f"{link} as root: the symbolic link {link} is in a directory others may write; "
                         "refusing to follow it")


UNSAFE = ["script owned by another user", "script writable by its group", "directory writable by others",
          "directory above owned by another user", "python file owned by another user",
          "another user's directory in a sticky one", "another user's link in a sticky directory",
          "root's file linked into a sticky directory"]


@pytest.mark.parametrize("kind", UNSAFE)
def test_a_file_others_could_change_is_refused_at_start_before_any_of_it_runs(tclrun, etc, kind):
    script, hooks, why = make_unsafe(etc, kind)
    m = tclrun(script, "--python", str(hooks), connection=TCP, wait=False)
    assert m.wait_exit(15) == 1, m.text
    assert f"pytclmilter run: refusing to load {why}\n" in m.text
    assert "script ran" not in m.text and "hooks ran" not in m.text  # neither file ran, as root or at all
    assert "listening on" not in m.text


@pytest.mark.parametrize("command", ["check", "try"])
def test_check_and_try_as_root_refuse_it_too(etc, command):
    """check is what an admin runs before a start or a reload: it fails as they would (exit 1), and
    runs nothing of the file (it would run as root). try exits 70, as for a file that fails to
    load (1 is its "rejected")."""
    script, hooks, why = make_unsafe(etc, "directory writable by others")
    message = [str(etc / "m.eml")] if command == "try" else []
    (etc / "m.eml").write_text("From: a@example.org\nTo: b@example.com\n\nhi\n")
    done = subprocess.run([*_pytclmilter_command(), command, str(script), *message, "--python", str(hooks)],
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == (1 if command == "check" else 70), done
    assert done.stderr == f"pytclmilter {command}: refusing to load {why}\n"
    assert "ran" not in done.stdout


def test_a_relative_path_is_checked_from_the_root_as_a_reload_checks_it(etc):
    """Run from the script's own directory (root's), below one another user owns: the start walked
    from the current directory alone and accepted it, every reload (which names the script from
    the root) refused it. Both refuse now."""
    os.chown(etc.parent, NOBODY, -1)
    done = subprocess.run([*_pytclmilter_command(), "check", "filter.tcl"], cwd=etc,
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert done.stderr == (f"pytclmilter check: refusing to load filter.tcl as root: {etc.parent} is owned by uid "
                           f"{NOBODY}, not root: that user could change what runs as root "
                           f"(chown root {etc.parent})\n"), done.stderr
    assert "ran" not in done.stdout


def sticky_tmp(etc: Path) -> Path:
    sticky = etc / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    return sticky


# A script with its own `info`, `string`, `dict`, `encoding` and `chan` (a tracing wrapper, an old
# compatibility layer; here ones that refuse): the Tcl of ours that runs in its interpreter (the
# checking `source`, the context command, private data, `puts`, 8-bit body blocks) must not call them.
OWN_CORE = r"""package require TclMilter
foreach command {info string dict encoding chan} {
    rename $command ::_$command
    proc ::$command {args} [list error "the script's own $command"]
}
source {LIB}
puts "sourced"
milter register helo helo
milter register body body
milter register eom eom
milter main
"""
OWN_CORE_LIB = r"""
proc helo {ctx host} { $ctx setpriv host $host; return SMFIS_CONTINUE }
proc body {ctx block} { $ctx setpriv block $block; return SMFIS_CONTINUE }
proc eom {ctx} {
    puts "eom from [$ctx getpriv host]"
    $ctx addheader X-Seen "[$ctx getpriv host] [$ctx getpriv block]"
    return SMFIS_CONTINUE
}
"""


def test_a_script_that_replaces_core_commands_sources_and_serves_as_root(tclrun, etc):
    """`rename info _info; proc info args {...}` (or `string`, `dict`, `encoding`, `chan`) made the
    checking `source` fail ("the script's own info"), then every context command and callback that
    reached our Tcl: the script did not load as root, nor did check pass it."""
    (etc / "lib.tcl").write_text(OWN_CORE_LIB)
    script = etc / "own.tcl"
    script.write_text(OWN_CORE.replace("{LIB}", str(etc / "lib.tcl")))
    done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "own.tcl: loaded" in done.stdout, done
    m = tclrun(script, connection=TCP)
    assert "sourced" in m.text
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo("mx.example") == ("c", {})
        mta.mail("<a@example.org>")
        assert mta.body(b"caf\xe9 au lait") == [("c", b"")]
        headers = [p for code, p in mta.eom() if code == "h"]
    assert headers == [b"X-Seen\0mx.example caf\xe9 au lait\0"]
    assert m.stop() == 0
    assert "eom from mx.example" in m.text and "the script's own" not in m.text, m.text


@pytest.mark.parametrize("where", ["root's directory", "root's file in a sticky directory",
                                   "root's link in a sticky directory", "relative to the current directory"])
def test_roots_own_files_are_run(tclrun, etc, where):
    """Root's 0644 files on a path of root's 0755 directories, as pytest's own under the sticky
    /tmp; in a sticky directory (/tmp) root's file, or root's link to it, is root's to change alone."""
    script, hooks = etc / "filter.tcl", etc / "hooks.py"
    if where == "root's file in a sticky directory":
        script = sticky_tmp(etc) / "filter.tcl"
        script.write_text(stamping("A"))
    elif where == "root's link in a sticky directory":
        script = sticky_tmp(etc) / "filter.tcl"
        script.symlink_to(etc / "filter.tcl")
    elif where == "relative to the current directory":  # (tclrun runs it in etc's parent's parent)
        script, hooks = Path("etc/milter/filter.tcl"), Path("etc/milter/hooks.py")
    m = tclrun(script, "--python", str(hooks), connection=TCP)
    assert "script ran" in m.text and "hooks ran" in m.text
    assert stamps(m) == [b"X-Stamp\0A\0"]
    assert m.stop() == 0


def test_a_file_others_could_change_is_not_loaded_at_reload_and_the_old_one_serves(tclrun, etc):
    script, hooks = etc / "filter.tcl", etc / "hooks.py"
    m = tclrun(script, "--python", str(hooks), connection=TCP)
    refused = r"ERROR: reload: generation 2 not loaded, generation 1 serves on unchanged: refusing to load "
    script.write_text(stamping("B"))
    os.chown(script, NOBODY, -1)
    m.child.kill(signal.SIGUSR1)
    m.wait_for(re.escape(refused + f"{script} as root: {script} is owned by uid {NOBODY}, not root: that user "
                         f"could change what runs as root (chown root {script})") + r"\r?\n")
    assert stamps(m) == [b"X-Stamp\0A\0"]
    os.chown(script, 0, -1)
    etc.chmod(0o775)
    m.child.kill(signal.SIGUSR1)
    m.wait_for(re.escape(refused + f"{script} as root: {etc} is writable by its group, who could change what "
                         f"runs as root (chmod g-w {etc})") + r"\r?\n")
    etc.chmod(0o755)
    hooks.chmod(0o646)
    m.child.kill(signal.SIGUSR1)
    m.wait_for(re.escape(refused + f"--python {hooks} as root: {hooks} is writable by others, who could "
                         f"change what runs as root (chmod o-w {hooks})") + r"\r?\n")
    assert stamps(m) == [b"X-Stamp\0A\0"]
    assert m.text.count("script ran") == 1 and m.text.count("hooks ran") == 1  # nothing new ran
    hooks.chmod(0o644)  # all fixed: the new script loads
    m.child.kill(signal.SIGUSR1)
    m.wait_for(r"reload: generation 1 is gone")
    assert stamps(m) == [b"X-Stamp\0B\0"]
    assert m.stop() == 0


# As test_cli's: nobody, with CAP_DAC_OVERRIDE to run this venv's Python (it may be in root's home).
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+dac_override", "--ambient-caps=+dac_override"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv to start as nobody")
def test_a_developers_own_account_is_not_checked(tclrun, etc):
    """Not root: the files do not run as root, and a developer's tree is often group-writable."""
    etc.chmod(0o777)
    script = etc / "filter.tcl"
    script.chmod(0o666)
    m = tclrun(script, "--python", str(etc / "hooks.py"), connection=TCP, prefix=AS_NOBODY)
    assert "script ran" in m.text and "hooks ran" in m.text
    assert stamps(m) == [b"X-Stamp\0A\0"]
    assert m.stop() == 0


def stale_cache(source: Path, text: str) -> Path:
    """``source`` with ``text`` formatted with B, and its cached .pyc (returned) compiled from
    ``text`` with A: the same mtime and size, which are all Python compares."""
    source.write_text(text.format("A"))
    st = source.stat()
    cached = Path(cache_from_source(str(source)))
    py_compile.compile(str(source), cfile=str(cached), doraise=True)
    source.write_text(text.format("B"))
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    return cached


def test_a_python_file_runs_as_its_source_says_and_leaves_no_bytecode(tclrun, etc):
    """Python ran a .pyc from the file's __pycache__ instead of the source when the mtime and size
    it records match the source's: a directory nothing checked decided what ran as root. And
    root wrote that __pycache__ into the admin's directory."""
    hooks = etc / "hooks.py"
    cached = stale_cache(hooks, 'print("hooks: {}", flush=True)\n\ndef setup(milter):\n    pass\n')
    m = tclrun(etc / "filter.tcl", "--python", str(hooks), connection=TCP)
    assert "hooks: B" in m.text and "hooks: A" not in m.text
    assert m.stop() == 0
    cached.unlink()
    cached.parent.rmdir()
    m = tclrun(etc / "filter.tcl", "--python", str(hooks), connection=TCP)
    m.child.kill(signal.SIGUSR1)
    m.wait_for(r"reload: generation 1 is gone")
    assert m.stop() == 0
    assert sorted(p.name for p in etc.iterdir()) == ["filter.tcl", "hooks.py"]


# What the files pull in as root: Tcl's `source` and `load` (and `package require`, which ends in
# them) and a --python file's imports are refused as the files themselves are.


@pytest.fixture
def theirs(tmp_path: Path) -> Path:
    """Another user's directory (0755), where root's scripts should find nothing to run."""
    lib = tmp_path / "lib"
    lib.mkdir()
    lib.chmod(0o755)
    os.chown(lib, NOBODY, -1)
    return lib


def pulling_in(line: str) -> str:
    """The script with ``line`` (its line 2) pulling something in before it registers."""
    return f'puts "script ran"\n{line}\n' + stamping("A").split("\n", 1)[1]


def owned_by_nobody(path: Path) -> str:
    return (f"{path} is owned by uid {NOBODY}, not root: that user could change what runs as root "
            f"(chown root {path})")


@pytest.mark.parametrize("kind", ["file of another user's", "file of root's in another user's directory",
                                  "file of root's, writable by others"])
def test_a_file_the_script_sources_is_refused_at_start_and_check_says_where(tclrun, etc, theirs, kind):
    rules = (theirs if kind.endswith("directory") else etc) / "rules.tcl"
    rules.write_text('puts "rules ran"\n')
    why = owned_by_nobody(theirs)
    if kind == "file of another user's":
        os.chown(rules, NOBODY, -1)
        why = owned_by_nobody(rules)
    elif kind.endswith("others"):
        rules.chmod(0o646)
        why = f"{rules} is writable by others, who could change what runs as root (chmod o-w {rules})"
    script = etc / "filter.tcl"
    script.write_text(pulling_in(f"source {rules}"))
    refused = f'refusing to source "{rules}" as root: {why}'
    m = tclrun(script, connection=TCP, wait=False)
    assert m.wait_exit(15) == 1, m.text
    assert refused in m.text and "script ran" in m.text
    assert "rules ran" not in m.text and "listening on" not in m.text
    done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"{script}:2: error: {refused}\n"), done.stderr
    assert "rules ran" not in done.stdout


@pytest.mark.parametrize("where", ["script", pytest.param("thread", marks=needs_thread)])
def test_a_package_index_in_another_users_directory_is_not_run(etc, theirs, where):
    """`package require` sources every pkgIndex.tcl below the auto_path: Tcl's scan says which
    one it could not read, and why, and the package is not found; in a thread too."""
    index = theirs / "foo" / "pkgIndex.tcl"
    index.parent.mkdir()
    index.write_text('puts "index ran"\npackage ifneeded Foo 1.0 {package provide Foo 1.0}\n')
    requiring = f"lappend auto_path {theirs}; package require Foo"
    script = etc / "filter.tcl"
    script.write_text(pulling_in(f"thread::send [thread::create] {{{requiring}}}" if where == "thread" else requiring))
    done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert (f'error reading package index file {index}: refusing to source "{index}" as root: '
            f"{owned_by_nobody(theirs)}\n{script}:2: error: can't find package Foo\n") in done.stderr
    assert "index ran" not in done.stdout


@needs_thread
def test_a_library_in_another_users_directory_is_not_loaded(tclrun, etc, theirs):
    library = theirs / THREAD.name
    shutil.copy(THREAD, library)
    script = etc / "filter.tcl"
    script.write_text(pulling_in(f'load {library} Thread; puts "loaded: [info loaded]"'))
    m = tclrun(script, connection=TCP, wait=False)
    assert m.wait_exit(15) == 1, m.text
    assert f'refusing to load "{library}" as root: {owned_by_nobody(theirs)}' in m.text
    assert "loaded:" not in m.text and "listening on" not in m.text


def test_a_file_sourced_at_reload_is_refused_and_the_old_script_serves(tclrun, etc, theirs):
    script = etc / "filter.tcl"
    m = tclrun(script, connection=TCP)
    rules = theirs / "rules.tcl"
    rules.write_text('puts "rules ran"\n')
    script.write_text(pulling_in(f"source {rules}").replace("{A}", "{B}"))
    m.child.kill(signal.SIGUSR1)
    m.wait_for(re.escape(f'refusing to source "{rules}" as root: {owned_by_nobody(theirs)}'))
    assert "rules ran" not in m.text
    assert stamps(m) == [b"X-Stamp\0A\0"]
    assert m.stop() == 0


IMPORTING = 'import sys\nsys.path.insert(0, {where!r})\nimport rules\n\ndef setup(milter):\n    pass\n'


@pytest.mark.parametrize("kind", ["module in another user's directory", "module of another user's beside the file"])
def test_a_module_the_python_file_imports_is_refused(tclrun, etc, theirs, kind):
    where = theirs if kind.startswith("module in") else etc
    module = where / "rules.py"
    module.write_text('print("rules ran", flush=True)\n')
    why = owned_by_nobody(theirs)
    if where == etc:
        os.chown(module, NOBODY, -1)
        why = owned_by_nobody(module)
    hooks = etc / "hooks.py"
    hooks.write_text(IMPORTING.format(where=str(where)))
    m = tclrun(etc / "filter.tcl", "--python", str(hooks), connection=TCP, wait=False)
    assert m.wait_exit(15) == 1, m.text
    assert (f"pytclmilter run: --python {hooks}: UnsafeModule: refusing to import rules from {module} as "
            f"root: {why}") in m.text
    assert "rules ran" not in m.text and "script ran" not in m.text and "listening on" not in m.text
    # The traceback: the file's import line, then the reason; none of pytclmilter's frames (its
    # lines indented, run's stderr being its log)
    trace = m.text[m.text.index("Traceback (most recent call last):"):].replace("\r\n", "\n")
    assert trace.startswith(f'Traceback (most recent call last):\n  File "{hooks}", line 3, in <module>\n'
                            f'    import rules\n  pytclmilter.rootimports.UnsafeModule: refusing to import rules'), trace


def test_an_extension_module_refused_shows_the_import_line_and_the_reason(tclrun, etc, theirs):
    """The extension loader's check raised in pytclmilter's frames, which the traceback showed."""
    module = theirs / "fast.cpython-311-x86_64-linux-gnu.so"
    shutil.copy(_any_extension(), module)
    hooks = etc / "hooks.py"
    hooks.write_text(IMPORTING.format(where=str(theirs)).replace("import rules", "import fast"))
    m = tclrun(etc / "filter.tcl", "--python", str(hooks), connection=TCP, wait=False)
    assert m.wait_exit(15) == 1, m.text
    trace = m.text[m.text.index("Traceback (most recent call last):"):].replace("\r\n", "\n")
    assert trace.startswith(f'Traceback (most recent call last):\n  File "{hooks}", line 3, in <module>\n'
                            f'    import fast\n  pytclmilter.rootimports.UnsafeModule: refusing to import fast from '
                            f'{module} as root: {owned_by_nobody(theirs)}'), trace


def _any_extension() -> str:
    """An extension module's file of this Python's (its name does not matter: it is refused
    before it is opened)."""
    import _json
    return str(_json.__file__)


def test_a_cached_module_in_another_users_pycache_is_not_run(tclrun, etc):
    """The source is root's; the .pyc beside it in a __pycache__ another user owns records the
    source's mtime and size, with other code: the source runs."""
    cached = stale_cache(etc / "rules.py", 'print("rules: {}", flush=True)\n')
    os.chown(cached.parent, NOBODY, -1)
    os.chown(cached, NOBODY, -1)
    hooks = etc / "hooks.py"
    hooks.write_text(IMPORTING.format(where=str(etc)))
    m = tclrun(etc / "filter.tcl", "--python", str(hooks), connection=TCP)
    assert "rules: B" in m.text and "rules: A" not in m.text
    assert m.stop() == 0


def test_roots_own_files_pulled_in_are_run(tclrun, etc):
    """A file sourced, a package (TclMilter's own, Thread), a command autoloaded through a tclIndex,
    a module beside the --python file: root's, also in an interpreter the script creates and in
    Thread's threads."""
    (etc / "rules.tcl").write_text('puts "rules ran: [file tail [info script]]"\n')
    (etc / "rules.py").write_text('print("rules.py ran", flush=True)\n')
    (etc / "hooks.py").write_text(IMPORTING.format(where=str(etc)))
    (etc / "tclIndex").write_text('# Tcl autoload index file, version 2.0\n'
                                  'set auto_index(autoloaded) [list source [file join $dir auto.tcl]]\n')
    (etc / "auto.tcl").write_text('proc autoloaded {} { return "autoloaded ran" }\n')
    script = etc / "filter.tcl"
    script.write_text(pulling_in(f'source [file join [file dirname [info script]] rules.tcl]\n'
                                 f'puts "Thread [package require Thread]"; lappend auto_path {etc}; puts [autoloaded]\n'
                                 f'interp create i; i eval {{source {etc}/rules.tcl; package require Thread}}\n'
                                 f'puts "thread: [thread::send [thread::create] {{source {etc}/auto.tcl; '
                                 f'list [autoloaded] [package require TclMilter]}}]"\n'
                                 f'set p [tpool::create -initcmd {{lappend auto_path {etc}}}]; set j [tpool::post $p '
                                 f'{{autoloaded}}]; tpool::wait $p $j; puts "worker: [tpool::get $p $j]"'))
    m = tclrun(script, "--python", str(etc / "hooks.py"), connection=TCP)
    assert "rules.py ran" in m.text and m.text.count("rules ran: rules.tcl") == 2 and "Thread 2." in m.text
    assert "autoloaded ran" in m.text
    assert "thread: {autoloaded ran} 1.0" in m.text and "worker: autoloaded ran" in m.text
    assert stamps(m) == [b"X-Stamp\0A\0"]
    assert m.stop() == 0


def check_refuses(etc: Path, line: str, refused: str, ran: str) -> None:
    """``pytclmilter check`` as root, as an admin runs it before a start, of the script pulling
    in with ``line``: exit 1 at that line with ``refused``; nothing printed ``ran``."""
    script = etc / "filter.tcl"
    script.write_text(pulling_in(line))
    done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"{script}:2: error: {refused}\n"), done.stderr
    assert ran not in done.stdout


def test_a_tcl_index_in_another_users_directory_is_not_evaluated(etc, theirs):
    """The autoloader (`unknown`, at the first unknown command) evaluated every tclIndex on the
    auto_path as it read it by name (init.tcl's ``eval [read $f]``): another user's ran as root."""
    index = theirs / "tclIndex"
    index.write_text('# Tcl autoload index file, version 2.0\nputs "index ran"\n')
    check_refuses(etc, f"lappend auto_path {theirs}; no_such_command",
                  f'refusing to source "{index}" as root: {owned_by_nobody(theirs)}', "index ran")


@pytest.mark.parametrize("where", ["process", "interp create", pytest.param("thread", marks=needs_thread)])
def test_a_tcl_index_on_the_auto_path_at_an_interpreters_making_is_not_evaluated(etc, theirs, where):
    """Making an interpreter (the script's, one it creates, a thread's) keeps Tcl's own `after`
    and `fconfigure` with `namespace import`, which runs Tcl's `auto_import`, which loads the
    autoloader's index: every tclIndex on the auto_path (TCLLIBPATH's directories among them)
    was evaluated by Tcl's own `auto_load_index` there, before the checking one was in place:
    another user's ran as root, with no unknown command called."""
    index = theirs / "tclIndex"
    index.write_text('# Tcl autoload index file, version 2.0\nputs "index ran"\n')
    making = {"process": "", "interp create": "interp create i",
              "thread": "package require Thread; thread::send [thread::create {thread::wait}] {set x 1}"}[where]
    script = etc / "filter.tcl"
    script.write_text(pulling_in(f"set env(TCLLIBPATH) {{{theirs}}}; {making}"))
    env = {"TCLLIBPATH": str(theirs)} if where == "process" else {}
    done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(env),
                          capture_output=True, text=True, timeout=60)
    assert "index ran" not in done.stdout, done
    if where != "process":
        assert done.returncode == 0 and "script ran" in done.stdout, done
    else:  # `package require TclMilter` is refused (the index is root's to run): one line, no traceback
        assert done.returncode == 1, done
        assert done.stderr == (f"pytclmilter check: cannot make the script's interpreter: refusing to source "
                               f'"{index}" as root: {owned_by_nobody(theirs)}\n'), done.stderr


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_tcl_index_another_user_made_a_fifo_or_a_link_is_refused_without_opening_it(etc, theirs, kind):
    """The autoloader opened each tclIndex by name to read its first line before `source` (which
    checks) was reached: as root, a FIFO of another user's held the start for ever in open(),
    their link to /dev/zero had root read without end, looking for a line's end. Now the file is
    checked before it is opened, and refused as a regular file of theirs is."""
    index = theirs / "tclIndex"
    if kind == "fifo":
        os.mkfifo(index)
    else:
        index.symlink_to("/dev/zero")
    os.chown(index, NOBODY, -1, follow_symlinks=False)
    script = etc / "filter.tcl"
    script.write_text(pulling_in(f"lappend auto_path {theirs}; no_such_command"))
    try:
        done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(),
                              capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"check as root still running after 15 s: {exc.stdout!r} {exc.stderr!r}") from None
    assert done.returncode == 1, done
    assert done.stderr.startswith(f'{script}:2: error: refusing to source "{index}" as root: '
                                  f"{owned_by_nobody(theirs)}\n"), done.stderr


@pytest.mark.parametrize("nested", [False, True], ids=["interp create", "interp create in it"])
def test_an_interpreter_the_script_creates_refuses_too(etc, theirs, nested):
    """An interpreter the script made had Tcl's own `source`, also below it."""
    rules = theirs / "rules.tcl"
    rules.write_text('puts "rules ran"\n')
    sourcing = f"i eval {{interp create j; j eval {{source {rules}}}}}" if nested else f"i eval {{source {rules}}}"
    check_refuses(etc, f"interp create i; {sourcing}",
                  f'refusing to source "{rules}" as root: {owned_by_nobody(theirs)}', "rules ran")


def test_a_library_named_without_a_path_is_refused_saying_why(etc):
    """Not in the current directory, Tcl has dlopen look for it where nothing checks."""
    check_refuses(etc, 'load libz.so.1 Z; puts "libz loaded"',
                  'refusing to load "libz.so.1" as root: not in the current directory, and the dynamic linker '
                  "would look for it in directories nothing checks (give the library's path)", "libz loaded")


TCLSH = shutil.which("tclsh8.6") or shutil.which("tclsh")

# Each case's result and errorInfo, printed by the script itself (with a byte order mark, as an
# editor may leave): under tclsh and, as root, through the checking `source`. The errorInfo's
# lines on one (pytclmilter indents the lines after a newline inside one `puts`).
SOURCING = "\ufeff" + r"""proc T {label script} {
    set code [catch {uplevel 1 $script} m o]
    puts "$label: $code <$m>"
    if {$code == 1} { puts "  <[dict get $o -errorcode]> <[string map {\n |} [dict get $o -errorinfo]]>" }
}
T bom {source bom.tcl}
T option {source -nocomplain x y}
T directory {source lib}
T home {source ~/no-such-file.tcl}
T nouser {source ~nosuchuser/x.tcl}
T load-home {load ~/no-such-library.so}
T load-nouser {load ~nosuchuser/x.so}
T package {lappend auto_path ~nosuchuser/lib; package require NoSuchPackage}
T encoding {source -encoding no-such-encoding bom.tcl}
T break {foreach i {1 2} { source break.tcl; puts "not reached" }}
namespace eval ns { T namespace {source ns.tcl} }
if {![catch {package require TclMilter}]} { milter main }
"""


@pytest.mark.skipif(TCLSH is None, reason="needs tclsh to compare with")
@pytest.mark.parametrize("home", ["set", "unset"])
def test_source_as_root_reads_and_fails_as_tclshs(etc, home):
    """A byte order mark first stopped the script (and a file it sourced) at line 1 as root;
    some errors were worded otherwise, or had the proc's frames in errorInfo; `~nosuchuser/x`
    (and `~/x` with HOME unset, as under systemd) was "no such file" where Tcl says why."""
    (etc / "bom.tcl").write_text('\ufeffputs "bom.tcl ran"\nreturn 42\n')
    (etc / "break.tcl").write_text("break\n")
    (etc / "ns.tcl").write_text("namespace current\n")
    (etc / "lib").mkdir(mode=0o755)
    script = etc / "probe.tcl"
    script.write_text(SOURCING)
    # Plain tclsh, without the TCLLIBPATH an in-process TclHost of an earlier test put in our
    # environment (it would find TclMilter, whose `milter main` works only under pytclmilter).
    dropped = {"TCLLIBPATH"} | ({"HOME"} if home == "unset" else set())
    plain = {k: v for k, v in os.environ.items() if k not in dropped}
    under_tclsh = subprocess.run([TCLSH, script.name], cwd=etc, env=plain, capture_output=True, text=True, timeout=60)
    assert under_tclsh.returncode == 0 and "bom.tcl ran" in under_tclsh.stdout, under_tclsh
    ours = {k: v for k, v in child_env().items() if k != "HOME" or home == "set"}
    done = subprocess.run([*_pytclmilter_command(), "check", script.name], cwd=etc, env=ours,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    assert done.stdout.split(f"{script.name}: loaded\n")[0] == under_tclsh.stdout


# The Thread package's threads: each has its own interpreter, in another thread, with Tcl's own
# `source` and `load` until the fix; another user's file ran as root. The script's thread is
# often waiting for the thread meanwhile (a synchronous thread::send, thread::join, tpool::post
# starting a worker), so the checks must be answered without it.

IN_THREADS = {
    "thread::send": "set t [thread::create]; thread::send $t {{{pulling}}}",
    "thread::send to a thread it creates": "thread::send [thread::create] {{thread::send [thread::create] {{{pulling}}}}}",
    "tpool -initcmd": "tpool::post [tpool::create -initcmd {{{pulling}}}] {{set x 1}}",
    "tpool::post": "set p [tpool::create]; set j [tpool::post $p {{{pulling}}}]; tpool::wait $p $j; tpool::get $p $j",
    "interp create in a thread": "thread::send [thread::create] {{interp create i; i eval {{{pulling}}}}}",
    "Thread loaded into an interpreter by its creator": "package require Thread; interp create i; load {{}} Thread i; "
                                                        "i eval {{thread::send [thread::create] {{{pulling}}}}}",
}


@needs_thread
@pytest.mark.parametrize("how", IN_THREADS)
def test_a_file_a_thread_sources_is_refused(etc, theirs, how):
    rules = theirs / "rules.tcl"
    rules.write_text('puts "rules ran"\n')
    check_refuses(etc, IN_THREADS[how].format(pulling=f"source {rules}"),
                  f'refusing to source "{rules}" as root: {owned_by_nobody(theirs)}', "rules ran")


@needs_thread
@pytest.mark.parametrize("options", ["-joinable", "-preserved -joinable"])
def test_a_thread_the_script_joins_does_not_run_another_users_file(tclrun, etc, theirs, options):
    """Its error is logged (Thread's errorproc: when the script's thread next runs its event
    loop, here once it serves); the script goes on. The script is found after any of
    thread::create's options. The thread waits for a gate the script opens once thread::create
    has returned: Thread's own `-preserved` reserves the thread after starting it, and fails
    with 'thread "tid..." does not exist' if its script has already ended (under tclsh too)."""
    marker = etc / "ran"
    rules = theirs / "rules.tcl"
    rules.write_text(f'close [open {marker} w]\n')
    script = etc / "filter.tcl"
    script.write_text(pulling_in(
        f"tsv::set gate open 0; "
        f"set t [thread::create {options} {{while {{![tsv::get gate open]}} {{after 10}}; source {rules}}}]; "
        f"tsv::set gate open 1; thread::join $t"))
    m = tclrun(script, connection=TCP)
    m.wait_for(re.escape(f'ERROR: error in thread tid0x') + r"[0-9a-f]+ " + re.escape(
        f'(thread::send -async, or the thread\'s own script): refusing to source "{rules}" as root: '
        f'{owned_by_nobody(theirs)}'))
    assert not marker.exists()
    assert stamps(m) == [b"X-Stamp\0A\0"]
    assert m.stop() == 0


@needs_thread
def test_a_library_a_thread_loads_is_refused(etc, theirs):
    library = theirs / THREAD.name
    shutil.copy(THREAD, library)
    check_refuses(etc, f'thread::send [thread::create] {{load {library} Thread; puts "loaded"}}',
                  f'refusing to load "{library}" as root: {owned_by_nobody(theirs)}', "loaded")


@needs_thread
@pytest.mark.parametrize(("call", "usage"), [
    ("thread::create -joinable a b", "thread::create ?-joinable? ?script?"),
    ("tpool::create -minworkers", "tpool::create ?-minworkers count? ?-maxworkers count? ?-initcmd script? "
                                  "?-exitcmd script? ?-idletime seconds?"),
])
def test_thread_commands_as_root_misused_say_so_by_their_own_name(etc, call, usage):
    """As root thread::create and tpool::create are procs calling Thread's, renamed: its usage
    error names the command the script called, as under tclsh, not the renamed one."""
    check_refuses(etc, f"package require Thread; {call}", f'wrong # args: should be "{usage}"', "never")


# The safe base (`::safe::interpCreate`) loads a library for its safe interpreter with that
# interpreter's hidden, Tcl's own `load` (`interp invokehidden`), from the master's auto_path: one
# of another user's ran its constructor as root at dlopen, before Tcl even asked for the safe
# init it may not have (as Thread has not). (The safe base reads what the safe interpreter
# sources, a package index among them, with `open` itself: that runs in the safe interpreter.)


def evil_library(etc: Path, theirs: Path) -> tuple[Path, Path]:
    """A library in ``theirs`` whose constructor, run at dlopen, makes the file returned second."""
    marker = etc / "constructor ran"
    source = etc / "evil.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void ran(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    library = theirs / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library, marker


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("index", ["theirs", "roots"])
def test_the_safe_base_loads_no_library_of_another_users_as_root(etc, theirs, index):
    library, marker = evil_library(etc, theirs)
    directory = theirs if index == "theirs" else etc / "lib"
    directory.mkdir(exist_ok=True)
    (directory / "pkgIndex.tcl").write_text(f"package ifneeded Evil 1 [list load {library} Evil]\n")
    script = etc / "filter.tcl"
    script.write_text(pulling_in(f"lappend auto_path {theirs} {directory}; ::safe::interpCreate s; "
                                 "puts \"safe: [catch {s eval {package require Evil}} e] $e\"; "
                                 f"puts \"hidden: [catch {{interp invokehidden s load {library} Evil}} e] $e\"; "
                                 f"puts \"own: [catch {{s invokehidden load {library} Evil}} e] $e\""))
    done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert not marker.exists()
    refused = f'refusing to load "{library}" as root: {owned_by_nobody(theirs)}'
    assert f"safe: 1 load of binary library for package Evil failed: {refused}\n" in done.stdout, done
    assert f"hidden: 1 {refused}\nown: 1 {refused}\n" in done.stdout, done
    assert done.returncode == 0, done


EXPOSED = "refusing to expose load as root: Tcl's own, which the interpreter hides, would not be checked"
MARKED = "refusing to mark an interpreter trusted as root: its hidden source and load, Tcl's own, would not be checked"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize(("way", "refused"), [
    ("interp expose s load; s eval {load LIB Evil}", EXPOSED),
    ("s expose load l; s eval {l LIB Evil}", EXPOSED),
    ("interp marktrusted s; s eval {interp create c; c eval {load LIB Evil}}", MARKED),
    ("s marktrusted; s eval {interp create -safe c; interp invokehidden c load LIB Evil}", MARKED),
    pytest.param("package require Thread; thread::send [thread::create] "
                 "{interp create -safe s; interp expose s load; s eval {load LIB Evil}}", EXPOSED, marks=needs_thread),
], ids=["expose", "own expose", "marktrusted", "own marktrusted", "thread"])
def test_a_safe_interpreter_exposed_or_marked_trusted_loads_no_library_of_another_users_as_root(
        etc, theirs, way, refused):
    """A safe interpreter's hidden `load` is Tcl's own: exposed (before: called unchecked), or the
    interpreter marked trusted (before: an interpreter it created had Tcl's own `load`, and it
    could invoke its children's hidden one), another user's library ran its constructor as root."""
    library, marker = evil_library(etc, theirs)
    script = etc / "filter.tcl"
    script.write_text(pulling_in("interp create -safe s; "
                                 f"puts \"way: [catch {{{way.replace('LIB', str(library))}}} e] $e\""))
    done = subprocess.run([*_pytclmilter_command(), "check", str(script)], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert not marker.exists()
    assert f"way: 1 {refused}\n" in done.stdout, done
    assert done.returncode == 0, done


THREADS_AFTER_DROP = r"""package require TclMilter
proc eom {ctx} {
    set t [thread::create]
    $ctx addheader X-Thread [thread::send $t {source RULES}]
    set p [tpool::create]
    set j [tpool::post $p {source RULES}]
    tpool::wait $p $j
    $ctx addheader X-Pool [tpool::get $p $j]
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


@needs_thread
def test_threads_after_privileges_are_dropped_are_plain_tcl(tclrun, etc):
    """Once --user has dropped root, a thread sources what that user may read, as under tclsh."""
    theirs = Path(tempfile.mkdtemp(dir="/tmp"))  # (where nobody may look: not below pytest's 0700 directory)
    theirs.chmod(0o755)
    os.chown(theirs, NOBODY, -1)
    rules = theirs / "rules.tcl"
    rules.write_text("return [exec id -u]\n")
    os.chown(rules, NOBODY, -1)
    script = etc / "filter.tcl"
    script.write_text(THREADS_AFTER_DROP.replace("RULES", str(rules)))
    m = tclrun(script, "--user", "nobody", connection=TCP)
    assert stamps(m) == [b"X-Thread\0" + f"{NOBODY}".encode() + b"\0", b"X-Pool\0" + f"{NOBODY}".encode() + b"\0"]
    assert m.stop() == 0


def python_m_check(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python3 -m pytclmilter.cli check ...`` run in ``cwd``, as root."""
    return subprocess.run([sys.executable, "-m", "pytclmilter.cli", "check", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=60)


def test_python_m_as_root_imports_nothing_from_a_current_directory_others_may_write(etc):
    """``python3 -m`` puts the current directory first on sys.path: another user's logging.py in
    /tmp ran as root before any check. The console script has its own directory there."""
    cwd = sticky_tmp(etc)
    marker = etc / "ran"
    (cwd / "logging.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    os.chown(cwd / "logging.py", NOBODY, -1)
    done = python_m_check(cwd, str(etc / "filter.tcl"))
    assert done.returncode == 0, done
    assert not marker.exists()
    assert done.stderr.startswith(f"pytclmilter: as root, not importing modules from the current directory {cwd}, "
                                  "which was first on sys.path (python3 -m or -c puts it there): others may add "
                                  "files to it or a directory above (use the pytclmilter command, or python3 -P)\n")


def test_python_m_as_root_imports_from_roots_own_current_directory(etc):
    """There only root could have put the module: the --python file's import beside it works."""
    (etc / "rules.py").write_text('print("rules.py ran", flush=True)\n')
    (etc / "hooks.py").write_text("import rules\n\ndef setup(milter):\n    pass\n")
    done = python_m_check(etc, "filter.tcl", "--python", "hooks.py")
    assert done.returncode == 0, done
    assert "rules.py ran" in done.stdout and done.stderr == ""


def test_a_program_run_from_its_own_directory_keeps_its_modules(theirs):
    """A program (not -m, not -c) has its own directory first on sys.path, wherever it is run
    from: run from that very directory as root, importing pytclmilter as a library took it off,
    and the program's next import of a module beside it failed (as it did not from elsewhere)."""
    (theirs / "program.py").write_text("import pytclmilter\nimport helper\nprint(helper.X)\n")
    (theirs / "helper.py").write_text("X = 'helper imported'\n")
    for cwd in (theirs, Path("/")):
        done = subprocess.run([sys.executable, str(theirs / "program.py")], cwd=cwd, env=child_env(),
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, "helper imported\n", ""), (cwd, done)


def test_the_pytclmilter_command_as_root_in_a_directory_others_may_write_says_nothing_of_it(etc):
    """The console script puts its own directory first on sys.path, not the current one: nothing
    to drop, nothing to say."""
    done = subprocess.run([*_pytclmilter_command(), "check", str(etc / "filter.tcl")], cwd=sticky_tmp(etc),
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    assert done.stderr == "", done.stderr

