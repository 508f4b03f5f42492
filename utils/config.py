"""Constants at the top of each script, overridable as --NAME=VALUE flags; errors that end a run in one line."""
import ast
import os
import json
import sys


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
        print("interrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # no space, read-only or missing folder, no permission: the path and the reason
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


def file_constants(path):
    """A script's constants block, read from its source without running it: {name: value} of the UPPERCASE names
    (not starting with _) that the script's own top level assigns a literal str, int, float or bool, in the
    order they are assigned. Names it imports are not its constants, whatever their case."""
    with open(path) as f:
        tree = ast.parse(f.read())
    constants = {}
    for node in tree.body:
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
        if name.isupper() and not name.startswith("_") and isinstance(value, (str, int, float, bool)):
            constants.setdefault(name, value)
    return constants


def script_constants(namespace):
    """The constants block (file_constants) of the script whose globals() `namespace` is, with their values."""
    return {k: namespace[k] for k in file_constants(namespace["__file__"])}


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
    if cfg[name] not in allowed:
        raise UserError(f"--{name} must be one of {', '.join(map(str, allowed))}, got {cfg[name]!r}")


def check_range(cfg, name, low, high, low_open=False, high_open=False):
    v = cfg[name]
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise UserError(f"--{name} must be in {lo}{low}, {high}{hi}, got {v!r}")


def print_config(title, cfg):
    print(f"{title}:")
    for k, v in cfg.items():
        print(f"  {k:<22} {json.dumps(v)}")


def resolve_config(defaults, argv, profiles=None, pick_device=None, env=("DATA_DIR",)):
    """defaults < the device profile's values < environment (for the names in `env`) < flags.

    Where defaults hold PROFILE (auto | cpu | gpu) and DEVICE (auto | cpu | cuda), 'auto' picks the GPU
    profile when a CUDA device is used.
    """
    explicit = parse_flags(defaults, argv)
    from_env = {k: os.environ[k] for k in env if k in defaults and k not in explicit and os.environ.get(k)}
    if "PROFILE" not in defaults:
        return {**defaults, **from_env, **explicit}
    check_choice({**defaults, **explicit}, "DEVICE", ("auto", "cpu", "cuda"))
    check_choice({**defaults, **explicit}, "PROFILE", ("auto", "cpu", "gpu"))
    device = pick_device(explicit.get("DEVICE", defaults["DEVICE"]))
    profile = explicit.get("PROFILE", defaults["PROFILE"])
    if profile == "auto":
        profile = "gpu" if device == "cuda" else "cpu"
    cfg = {**defaults, **profiles.get(profile, {}), **from_env, **explicit}
    cfg["DEVICE"], cfg["PROFILE"] = device, profile
    return cfg


def configure(title, namespace, argv, check, profiles=None, pick_device=None):
    """A script's resolved constants (resolve_config on the constants block in `namespace`), checked by
    check(cfg) and printed: what each script does first."""
    cfg = resolve_config(script_constants(namespace), argv, profiles or {}, pick_device)
    check(cfg)
    print_config(f"{title} ({cfg['PROFILE']} profile)" if "PROFILE" in cfg else title, cfg)
    return cfg
