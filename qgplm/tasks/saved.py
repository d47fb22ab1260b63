"""Reading the task section of a config saved in a run dir whose task has no `_target_`.

Run dirs keep the composed config (`.hydra/config.yaml`), and `python -m qgplm.export` rebuilds
a student from it. A config written when the task was chosen by `task.source` (a name, decoded
in code) has no `_target_`; this maps such a section onto the task class and the fields that now
say in YAML what the name implied, so those run dirs stay exportable. Fresh configs always carry
`_target_` (conf/task/*.yaml) and pass through unchanged.
"""

from __future__ import annotations

from typing import Any

_WIKITEXT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
# task.source -> (task class, the fields its name implied)
SOURCES: dict[str, tuple[str, dict[str, Any]]] = {
    "builtin": ("qgplm.tasks.lm.BuiltinCorpus", {}),
    "wikitext2": ("qgplm.tasks.lm.LanguageModelling", {"files": _WIKITEXT_FILES, "text_column": "text"}),
    "wikitext103": ("qgplm.tasks.lm.LanguageModelling", {"files": _WIKITEXT_FILES, "text_column": "text"}),
    "ptb": ("qgplm.tasks.lm.LanguageModelling",
            {"files": {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
             "text_column": "sentence"}),
    "xsum": ("qgplm.tasks.summarization.Summarization",
             {"document_column": "document", "summary_column": "summary"}),
    "cnndm": ("qgplm.tasks.summarization.Summarization",
              {"document_column": "article", "summary_column": "highlights"}),
    "personachat": ("qgplm.tasks.persona_chat.NextUtterance", {}),
}


def with_target(task: Any) -> Any:
    """`task` with `_target_` and the implied fields where it names a known `source` instead."""
    if not isinstance(task, dict) or "_target_" in task or task.get("source") not in SOURCES:
        return task
    rest = {k: v for k, v in task.items() if k != "source"}
    target, implied = SOURCES[task["source"]]
    files = {**implied.get("files", {}), **rest.get("files", {})}
    return {"_target_": target, **implied, **rest, **({"files": files} if files else {})}
