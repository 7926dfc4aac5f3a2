"""The one settings parser and command-line wrapper of every script: the script's dataclass < config
files (Python, as in nanoGPT) < --key=value, checked up front. docs/pretraining.md#settings."""

import difflib
import functools
import importlib
import inspect
import math
import os
import re
import sys
import traceback
from dataclasses import fields

class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was saved and how to go on."""

def command(main):
    """A script's main(argv): a failure the user can fix ends in one 'error:' line, Ctrl-C too."""
    @functools.wraps(main)
    def wrapped(argv: list[str]):
        if parent := os.environ.get("MLM_VS_CLM_PARENT"):  # a child of experiment.py
            die_with_parent(int(parent))
        try:
            return main(argv)
        except (ValueError, OSError, ImportError, FloatingPointError) as e:
            raise SystemExit(f"error: {e}") from None
        except KeyboardInterrupt as e:
            print(f"\ninterrupted: {e or 'only the files written are kept'}", file=sys.stderr)
            raise SystemExit(130) from None
    return wrapped

def die_with_parent(parent: int) -> None:
    """This process dies when its parent does, even by kill -9 (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before that took effect
            os._exit(1)

def optional(module: str, needed_by: str):
    """An optional package, imported only on the path that needs it, or one line to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(f"{needed_by} needs the optional {package} package: "
                          f"pip install {package}") from None

def check(cfg) -> None:
    """Stops with every problem cfg.checks() finds: (condition, message) pairs."""
    if problems := [message for ok, message in cfg.checks() if not ok]:
        raise SystemExit("error: " + "; ".join(problems))

def at_least(cfg, minimum, *names) -> list:
    return [(getattr(cfg, n) >= minimum, f"--{n} must be >= {minimum}, got {getattr(cfg, n)}")
            for n in names]

def above(cfg, minimum, *names) -> list:
    return [(getattr(cfg, n) > minimum, f"--{n} must be > {minimum}, got {getattr(cfg, n)}")
            for n in names]

def one_of(cfg, name: str, choices) -> list:
    return [(getattr(cfg, name) in choices,
             f"--{name}={getattr(cfg, name)!r} must be one of {', '.join(map(str, choices))}")]

def parse_value(kind, text: str):
    if kind is bool:
        return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
    if kind is int:
        try:
            return int(text)
        except ValueError:
            if (number := float(text)) != int(number):  # 1e9, 2.5e6: integers written short
                raise
            return int(number)
    return kind(text)

def run_config_file(path: str) -> dict:
    """The names a config file assigns, or one line naming the file and line of what is wrong."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path} not found")
    scope = {}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), scope)
    except SyntaxError as e:
        raise SystemExit(f"error: {path}, line {e.lineno}: {e.msg} (a Python file)") from None
    except Exception as e:  # whatever the file does wrong, name the file and its line
        line = next((frame.lineno for frame in reversed(traceback.extract_tb(e.__traceback__))
                     if frame.filename == path), None)
        where = f"{path}, line {line}" if line else path
        raise SystemExit(f"error: {where}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_") and not inspect.ismodule(v)}

def configure(cls, argv: list[str], check_now: bool = True):
    """cls from argv (config files, --key=value); a bad setting stops here (checks: check_now)."""
    cfg, names = cls(), [f.name for f in fields(cls)]
    if "--help" in argv or "-h" in argv:
        # each field's trailing comment in the class source, then cls.HELP
        comments = re.findall(r"^\s+(\w+): [^=]+= .*?  # (.*)$", inspect.getsource(cls), re.M)
        helps = dict(comments) | getattr(cls, "HELP", {})
        print("settings (defaults shown; override with a config file or --key=value):")
        for name in names:
            print(f"  {f'--{name}={getattr(cfg, name)!r}':<40} {helps.get(name, '')}")
        sys.exit(0)

    def set_value(key, value, where):
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SystemExit(f"error: unknown setting {key!r} in {where}{hint}; see --help")
        kind = type(getattr(cfg, key))
        wrong_type = f"error: --{key} must be of type {kind.__name__}, got {value!r} in {where}"
        if isinstance(value, str) and kind is not str:
            try:
                value = parse_value(kind, value)
            except (KeyError, ValueError, OverflowError):
                raise SystemExit(wrong_type) from None
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise SystemExit(wrong_type)
        if kind is float and not math.isfinite(value):  # inf passes every "> 0" check downstream
            raise SystemExit(f"error: --{key} must be a finite number, got {value!r} in {where}")
        if kind is int and not -2**63 <= value < 2**63:
            raise SystemExit(f"error: --{key}={value} does not fit in 64 bits ({where})")
        setattr(cfg, key, value)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep and type(getattr(cfg, key, None)) is not bool:
                raise SystemExit(f"error: write settings as --{key}=VALUE")
            set_value(key, value if sep else "true", "the command line")  # --flag: a bool on
        elif arg.endswith(".py"):
            for key, value in run_config_file(arg).items():
                set_value(key, value, arg)
        else:
            raise SystemExit(f"error: unexpected argument {arg!r}: give config files (.py) and "
                             "--key=value settings")
    if check_now and hasattr(cfg, "checks"):
        check(cfg)
    return cfg

def explicit_keys(argv: list[str]) -> set:
    """The settings given on the command line (not through config files)."""
    return {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
