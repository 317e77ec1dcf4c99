"""What the command lines (flmjax.main, flmjax.convert, flmjax.bench) share: flag parsing
whose mistakes are one line on standard error with exit status 2."""

import os
import re
import sys

from absl import flags

HELP = {"-h", "--help", "--helpshort", "--helpfull", "-?"}


def fail(program: str, message: str) -> None:
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_importable(argv) -> None:
  """Puts the folder above a --config file's `configs` folder on the import path, so that
  the configs, which import each other as configs.*, load from any working directory."""
  for flag, value in zip(argv[1:], argv[2:] + [""]):
    path = flag.removeprefix("--config=") if flag.startswith("--config=") else (
        value if flag == "--config" else None)
    if path:
      folder = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
      if os.path.basename(folder) == "configs" and os.path.dirname(folder) not in sys.path:
        sys.path.insert(0, os.path.dirname(folder))


def parse_flags(argv, program: str):
  """absl flag parsing, with one-line errors for an unknown flag, a config file that
  cannot be loaded and a config override that does not exist."""
  _config_importable(argv)
  try:
    rest = flags.FLAGS(argv)
  except ImportError as e:  # raised by the config file
    fail(program, f"--config: the config file failed to import: {e} (a config importing "
         "configs.* must be in a folder named configs).")
  except SystemExit as e:  # absl exits 1 after printing --help; help is not an error
    sys.exit(0 if HELP & set(argv[1:]) else e.code)
  except (AttributeError, KeyError) as e:  # ml_collections names the field
    # its KeyError's text may be the repr of a nested one: the names, on one line, the
    # override's whole name where one ends in the unknown one
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    hint = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text)
    if hint:
      names = [a.split("=")[0].removeprefix("--config.") for a in argv[1:]
               if a.startswith("--config.")]
      field = next((n for n in names if hint[2] in n.split(".")), hint[2])
      suggestion = ".".join(field.split(".")[:field.split(".").index(hint[2])] + [hint[1]])
      message = f"{field!r} (did you mean {suggestion!r}?)"
    else:
      message = " ".join(text.split())
      if re.fullmatch(r"[\"']*[\w.]+[\"']*", message):  # a bare (quoted) name
        message = repr(message.strip("\"'"))
    fail(program, f"unknown config field {message}; configs/base.py lists every field.")
  except flags.Error as e:
    fail(program, f"{e}; see --help.")
  config = flags.FLAGS["config"]
  try:
    if config.value is not None:
      config.value.get("seed")  # a config file that failed to load raises on first use
  except OSError as e:
    reason = str(e).strip().split("\n")[-1].strip()
    fail(program, f"--config={config.config_filename}: {reason} (run from the repository "
         "root: configs import each other as configs.*).")
  return rest
