"""Constants at the top of each script, overridable as --NAME=VALUE flags; errors that end a run in one line.

The flag rule: a script's constants block is what lies between its first two lines that start with BLOCK_MARKER;
every name the block assigns a literal str, int, float or bool is a constant, and every constant is a flag of
the same name. Nothing outside the block is a flag. A script turns its block into a frozen dataclass once
(config_type), and configure() returns that type's one instance for the run.
"""
import ast
import dataclasses
import os
import json
import sys
from types import SimpleNamespace


class UserError(Exception):
    """A mistake of the user's (bad flag, missing file, ...): printed as one line, exit status 2."""


def run_cli(main):
    """Run main(argv); a UserError becomes 'error: ...' on stderr and exit status 2, no traceback."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # one line: the other ranks of a data-parallel run end quietly (utils.dist.data_parallel)
        print("interrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # no space, read-only or missing folder, no permission: the path and the reason
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


BLOCK_MARKER = "# ---"


def file_constants(path):
    """A script's constants, read from its source without running it: {name: value} of what its constants block
    (the lines between its first two lines starting with BLOCK_MARKER) assigns a literal str, int, float or bool,
    in the order assigned."""
    with open(path) as f:
        source = f.read()
    markers = [i + 1 for i, line in enumerate(source.splitlines()) if line.startswith(BLOCK_MARKER)][:2]
    if len(markers) < 2:
        raise ValueError(f"{path}: no constants block (two lines starting with {BLOCK_MARKER!r})")
    constants = {}
    for node in ast.parse(source).body:
        if not markers[0] < node.lineno < markers[1]:
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        else:
            continue
        try:
            value = ast.literal_eval(value)
        except ValueError:
            continue
        if isinstance(value, (str, int, float, bool)):
            constants.setdefault(name, value)
    return constants


def config_type(name, path):
    """A frozen dataclass `name` with one typed field per constant of the script at `path` (file_constants),
    defaulting to its value there: the type of that script's configuration."""
    return dataclasses.make_dataclass(name, [(k, type(v), dataclasses.field(default=v))
                                             for k, v in file_constants(path).items()], frozen=True)


def config_defaults(config_cls):
    """{constant: its default} of a configuration type (config_type)."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}


def parse_value(name, text, default):
    """Turn a flag's text into the type of its default; raise UserError when it does not fit."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool) and text.lower() in ("true", "false"):  # as the printed config writes them
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--{name} expects {type(default).__name__}, got {text!r}") from None
    if isinstance(default, bool) != isinstance(value, bool):
        raise UserError(f"--{name} expects {type(default).__name__}, got {text!r}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if not isinstance(value, type(default)):
        raise UserError(f"--{name} expects {type(default).__name__}, got {text!r}")
    return value


def parse_flags(defaults, argv):
    """The constants given as --NAME=VALUE (or --NAME VALUE) flags, typed like their defaults; unknown names
    are errors."""
    cfg = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; flags look like --NAME=VALUE")
        name, sep, text = arg[2:].partition("=")
        if not sep:
            if not args or args[0].startswith("--"):
                raise UserError(f"--{name} needs a value (--{name}=VALUE)")
            text = args.pop(0)
        if name not in defaults:
            raise UserError(f"unknown constant --{name}; known: {', '.join(sorted(defaults))}")
        cfg[name] = parse_value(name, text, defaults[name])
    return cfg


def check_choice(cfg, name, allowed):
    value = getattr(cfg, name)
    if value not in allowed:
        raise UserError(f"--{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def check_range(cfg, name, low, high, low_open=False, high_open=False):
    v = getattr(cfg, name)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise UserError(f"--{name} must be in {lo}{low}, {high}{hi}, got {v!r}")


def print_config(title, cfg):
    print(f"{title}:")
    for k, v in cfg.items():
        print(f"  {k:<22} {json.dumps(v)}")


def resolve_config(defaults, argv, profiles=None, pick_device=None, env=("DATA_DIR", "RANKS")):
    """defaults < the device profile's values < environment (for the names in `env`) < flags.

    Where defaults hold PROFILE (auto | cpu | gpu) and DEVICE (auto | cpu | cuda), 'auto' picks the GPU
    profile when a CUDA device is used.
    """
    explicit = parse_flags(defaults, argv)
    from_env = {k: os.environ[k] for k in env if k in defaults and k not in explicit and os.environ.get(k)}
    if "PROFILE" not in defaults:
        return {**defaults, **from_env, **explicit}
    given = SimpleNamespace(**{**defaults, **explicit})
    check_choice(given, "DEVICE", ("auto", "cpu", "cuda"))
    check_choice(given, "PROFILE", ("auto", "cpu", "gpu"))
    device = pick_device(explicit.get("DEVICE", defaults["DEVICE"]))
    profile = explicit.get("PROFILE", defaults["PROFILE"])
    if profile == "auto":
        profile = "gpu" if device == "cuda" else "cpu"
    cfg = {**defaults, **profiles.get(profile, {}), **from_env, **explicit}
    cfg["DEVICE"], cfg["PROFILE"] = device, profile
    return cfg


def configure(config_cls, title, argv, check, profiles=None, pick_device=None, show=True):
    """The run's configuration: an instance of the script's config_cls (config_type) with the constants resolved
    (resolve_config), checked by check(cfg) and printed (show=False: by the caller, once its layout of ranks is
    known: utils.dist.data_parallel): what each script does first."""
    defaults = config_defaults(config_cls)
    cfg = config_cls(**resolve_config(defaults, argv, profiles or {}, pick_device))
    check(cfg)
    if show:
        show_config(title, cfg)
    return cfg


def show_config(title, cfg):
    """Print a script's resolved configuration under its title (and profile, where it has one)."""
    print_config(f"{title} ({cfg.PROFILE} profile)" if hasattr(cfg, "PROFILE") else title, dataclasses.asdict(cfg))
