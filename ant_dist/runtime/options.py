"""Stage options as dataclasses: `opt` declares an option (default, help, allowed values), and the
loader merges defaults <- a YAML file <- `key=value` overrides with OmegaConf's structured mode (an
unknown key or a value of the wrong type is an error naming the key; `ConfigError` rewraps it into
one readable line). `parse_cli` gives every entry point `--config`, `--help` (from the help texts)
and `--print-config`. The stage configs themselves are in ant_dist/config.py.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ant_dist.runtime.atomic import write_text_atomic
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


def opt(default: Any, help: str, choices: Optional[Sequence] = None, **kw: Any) -> Any:
    """A dataclass field with a help text (lists/dicts get a default_factory) and, for an option that
    names one of a fixed set of values, those values (`choices`, checked by load_config)."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def check_choices(cfg: Any) -> None:
    """Refuse a value outside its option's `choices` (every element, for a list option)."""
    problems = []
    for f in dataclasses.fields(cfg):
        allowed = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if allowed is not None and any(v not in allowed for v in (value if isinstance(value, list) else [value])):
            shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed)
            problems.append(f"{f.name} must be one of {shown}, got {value!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def field_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field of a config dataclass (help ends with the choices)."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tname = getattr(f.type, "__name__", str(f.type))
        text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            text += f" [choices: {', '.join(repr(c) if c == '' else str(c) for c in f.metadata['choices'])}]"
        rows.append((f.name, tname, default, text))
    return rows


def format_help(cls: type, prog: str, description: str) -> str:
    lines = [f"usage: {prog} [--config FILE.yaml] [key=value ...]", "", description.strip(), "",
             "options (set in the YAML file or as key=value; '???' = required):"]
    for name, tname, default, text in field_help(cls):
        lines.append(f"  {name}={default!r}  ({tname})")
        lines.append(f"      {text}")
    lines += ["", "  --NAME          shorthand for NAME=true on a boolean option (e.g. --overwrite)",
              "  --config FILE   YAML file with any of the options above",
              "  --print-config  print the resolved config and exit", "  -h, --help      this text"]
    return "\n".join(lines)


def load_config(cls: type[T], config_file: Optional[str | Path] = None,
                overrides: Sequence[str] = ()) -> T:
    """Merge defaults <- YAML file <- `key=value` overrides into a validated `cls` instance."""
    try:
        merged = OmegaConf.structured(cls)
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, _load_yaml(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        # `key=` on a text option means the empty text (OmegaConf would read null: a type error)
        texts = {f.name for f in dataclasses.fields(cls) if f.type in (str, "str")}
        overrides = [f"{o}''" if o.endswith("=") and o[:-1].strip() in texts else o for o in overrides]
        merged = OmegaConf.merge(merged, *_parse_overrides(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")
        cfg = OmegaConf.to_object(merged)
        check_choices(cfg)
        return cfg  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        # The first line of OmegaConf's message names the key and the problem.
        msg = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{key}: {msg}" if key else msg) from None


def _parse_overrides(overrides: list) -> list:
    """`key=value` overrides as OmegaConf nodes, one each, to merge in order; a value YAML cannot
    read (`ablate=[T`) is a ConfigError naming it, not a parser traceback."""
    import yaml

    nodes = []
    for o in overrides:
        try:
            nodes.append(OmegaConf.from_dotlist([o]))
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{o!r}: the value is not valid YAML ({problem})") from None
    return nodes


def _load_yaml(path: Path):
    """The file as an OmegaConf node; a YAML syntax error becomes one line: file, line, column."""
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML at {where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (so any run can be repeated from its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _usage_error(message: str) -> None:
    """One line on stderr and exit code 2 (the convention for a bad command line)."""
    print(message, file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def flag_overrides(argv: Sequence[str], flags: Sequence[str], positional: Optional[str] = None,
                   many: bool = False) -> list[str]:
    """Conventional flags -> overrides: `--name value` / `--name=value` (dashes or underscores) for
    the named options become `name=value`; bare arguments become `positional=...` (the first one in
    place, or with many=True all of them as one list at the end); `--config FILE`, `key=value` and
    other flags pass through for parse_cli."""
    import json

    names, args, out, bare, i = set(flags), list(argv), [], [], 0
    while i < len(args):
        a = args[i]
        key, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in names and eq:
            out.append(f"{key}={value}")
        elif key in names and i + 1 < len(args):
            out.append(f"{key}={args[i + 1]}")
            i += 1
        elif a == "--config" and i + 1 < len(args):
            out += [a, args[i + 1]]
            i += 1
        elif positional and not a.startswith("-") and "=" not in a and (many or not bare):
            bare.append(a)
            if not many:
                out.append(f"{positional}={a}")
        else:
            out.append(a)
        i += 1
    if many and bare:  # JSON is YAML: the values keep their commas and colons
        out.append(f"{positional}={json.dumps(bare)}")
    return out


def parse_cli(cls: type[T], argv: Optional[Sequence[str]], prog: str, description: str) -> T:
    """`--config FILE`, `--help`, `--print-config` and `key=value` overrides for one stage."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(format_help(cls, prog, description))
        raise SystemExit(0)
    print_only = "--print-config" in args
    args = [a for a in args if a != "--print-config"]
    config_file = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            _usage_error(f"{prog}: --config needs a file")
        config_file = args[i + 1]
        del args[i:i + 2]
    # `--name` is shorthand for `name=true` on boolean options (e.g. `--overwrite`)
    bools = {f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
    args = [f"{a[2:].replace('-', '_')}=true" if a.startswith("--") and a[2:].replace("-", "_") in bools else a
            for a in args]
    unknown_flags = [a for a in args if a.startswith("-")]
    if unknown_flags:
        _usage_error(f"{prog}: unknown flag(s) {unknown_flags}; options are key=value (see --help)")
    try:
        cfg = load_config(cls, config_file, args)
    except ConfigError as exc:
        _usage_error(f"{prog}: config error: {exc}")
    if print_only:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        raise SystemExit(0)
    return cfg
