"""Raw text of a language-modelling task, from local files or the hub.

Both return {"train", "valid", "test"} -> str. Local files are read as UTF-8 with
their lines kept (newlines included); hub data sets are joined line by line the same way, so
the perplexity protocol is the same wherever the text comes from.
"""

from __future__ import annotations

from pathlib import Path

from qgplm.data.settings import LMSettings
from qgplm.errors import QgplmError, optional_module
from qgplm.hub import hub_reachable

SPLITS = ("train", "valid", "test")
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def load_texts(task: LMSettings) -> dict[str, str]:
    """The three splits of `task` as text: `task.data_dir` + `task.files`, else the hub."""
    if task.data_dir is not None:
        return _read_local(task)
    return _read_hub(task)


def _read_local(task: LMSettings) -> dict[str, str]:
    root = Path(task.data_dir).expanduser()
    if not root.is_dir():
        raise QgplmError(f"task.data_dir={task.data_dir} is not a directory: point it at the folder "
                         f"holding the {task.name} files")
    out = {}
    for split in SPLITS:
        if split not in task.files:
            raise QgplmError(f"no file name for the {split} split of {task.name}: set task.files.{split}=<file name>")
        path = root / task.files[split]
        if not path.is_file():
            raise QgplmError(f"missing {split} file {path}: set task.files.{split}=<file name> or fix task.data_dir")
        try:
            out[split] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise QgplmError(f"{path} is not UTF-8 text (byte {e.start}): convert it with iconv -t UTF-8") from None
        if not out[split].strip():
            raise QgplmError(f"the {split} file {path} is empty: put the {split} text there or point "
                             f"task.files.{split} at another file")
    return out


def _read_hub(task: LMSettings) -> dict[str, str]:
    if not task.hub_path:
        raise QgplmError(f"task {task.name} has no hub data set: pass task.data_dir=<folder with its files>")
    if not hub_reachable():
        raise QgplmError(f"the Hugging Face hub is unreachable, so {task.hub_path}/{task.hub_name} cannot be "
                         f"downloaded: pass task.data_dir=<local folder> (offline copy: ../shared/data)")
    datasets = optional_module("datasets", "a hub data set", "pass task.data_dir=<local folder>")
    ds = datasets.load_dataset(task.hub_path, task.hub_name)
    return {split: "".join(_with_newline(t) for t in ds[HUB_SPLITS[split]][task.text_column]) for split in SPLITS}


def _with_newline(line: str) -> str:
    return line if line.endswith("\n") else line + "\n"
