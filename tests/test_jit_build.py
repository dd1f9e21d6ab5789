"""tests/jit_build.py: a `lock` file left in a JIT build directory (by a killed build, or by torch 2.14's own load)
must not make a later load on torch < 2.14 wait for ever."""
import os
import signal
import subprocess
import sys
import textwrap

import jit_build

TESTS = os.path.dirname(os.path.abspath(__file__))


def _python(code, **kwargs):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=TESTS, capture_output=True, text=True,
                          **kwargs)


def test_load_after_a_killed_build(tmp_path):
    """torch < 2.14's own load waits for ever on the `lock` file a killed build leaves; ours removes it and loads."""
    src = tmp_path / "tiny.cpp"
    src.write_text("extern \"C\" int segfp16_tiny() { return 7; }\n")
    code = f"""
        import jit_build
        jit_build.load({str(tmp_path / "build")!r}, name="segfp16_tiny", sources=[{str(src)!r}],
                       is_python_module=False)
        print("loaded")
    """
    first = _python(code, timeout=300)
    assert first.returncode == 0 and "loaded" in first.stdout, first.stderr
    (tmp_path / "build" / "lock").touch()  # what `kill -9` during a build leaves behind
    again = _python(code, timeout=120)  # torch < 2.14's load alone would time out here
    assert again.returncode == 0 and "loaded" in again.stdout, again.stderr
    assert ("no live build holds it" in again.stdout) == jit_build.BARE_LOCK_FILE


def test_a_live_build_is_waited_for(tmp_path):
    """A build in progress in another process keeps its lock: held() waits until that process is done."""
    build, done = tmp_path / "build", tmp_path / "done"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time, jit_build
        with jit_build.held({str(build)!r}):
            open(os.path.join({str(build)!r}, "lock"), "w").close()  # torch's baton, as during a live build
            print("holding", flush=True)
            time.sleep(1.0)
            os.remove(os.path.join({str(build)!r}, "lock"))
            open({str(done)!r}, "w").close()
    """)], cwd=TESTS, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "holding"
    with jit_build.held(str(build)):
        assert done.exists()  # entered only after the live build finished
    assert child.wait(timeout=30) == 0


def test_a_killed_holder_releases(tmp_path):
    """kill -9 of a holder drops its flock (the OS does it): the next held() goes on and clears the lock it left."""
    build = tmp_path / "build"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time, jit_build
        with jit_build.held({str(build)!r}):
            open(os.path.join({str(build)!r}, "lock"), "w").close()
            print("holding", flush=True)
            time.sleep(600)
    """)], cwd=TESTS, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "holding"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with jit_build.held(str(build)):
        assert not (build / "lock").exists()
