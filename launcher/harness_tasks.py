"""The tasks of eval.harness: what each names, whether its data is on this side of the network, and
the bundled tasks' lm-eval YAMLs.

An entry of eval.harness.tasks is one of:
- a bundled task (BUNDLED): exact match (`tiny_tasks`) or log-likelihood (`tiny_tasks_ll`) of the
  answers of the bundled eval split, written as lm-eval task YAMLs by the eval job;
- a path to an lm-eval task YAML (`.yaml`/`.yml`), its `include:` chain followed;
- a task, group or tag of lm-eval's own registry.
Compute nodes are offline: a task whose data would come from the Hugging Face Hub is refused at
submission, with how to make it local, unless eval.harness.allow_hub=true. lm-eval itself is not
imported here (the login node need not pay for it): its registry is read as YAML text.
"""

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from launcher.atomic import write_text_atomic

BUNDLED_DATA = "bundled://tiny-tasks/eval.jsonl"
BUNDLED = {
    "tiny_tasks": "exact match of greedy answers on the bundled eval split (a tiny_sft model's task)",
    "tiny_tasks_ll": "log-likelihood of the bundled eval split's answers: perplexity and greedy acc",
}
# datasets' builders that read local files (dataset_kwargs.data_files) instead of a Hub repository.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}
HOW_TO_LOCAL = ("copy its YAML, set `dataset_path: json` and `dataset_kwargs: {data_files: {test: /abs/path.jsonl}}` "
                "(files on a filesystem the eval job sees), and list the YAML's path in eval.harness.tasks; or set "
                "eval.harness.allow_hub=true where compute nodes reach the Hub or HF_DATASETS_CACHE holds the data")


class _Loader(yaml.SafeLoader):
    """lm-eval's YAMLs tag Python hooks (`!function utils.process_docs`): read, never run."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def is_path(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) or "/" in task


def read_task_yaml(path: Path) -> Dict[str, Any]:
    """A task YAML with its `include:` chain merged (the including file wins), as lm-eval reads it."""
    data = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a task (a YAML mapping)")
    include = data.pop("include", None)
    if include:
        base = read_task_yaml((path.parent / include) if not Path(include).is_absolute() else Path(include))
        data = {**base, **data}
    return data


def lm_eval_tasks_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("lm_eval")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


@lru_cache(maxsize=None)
def _registry(tasks_dir: str) -> Dict[str, List[str]]:
    """{name: [YAML files that define it as task, group or tag]} over lm-eval's own tasks (~14k files)."""
    names: Dict[str, List[str]] = {}
    key = re.compile(r"^(task|group|tag):\s*(.*)$")
    for path in Path(tasks_dir).rglob("*.y*ml"):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            found = key.match(line)
            if not found:
                continue
            value = found.group(2).strip().strip("'\"")
            if value:
                found_names = [value] if not value.startswith("[") else [v.strip(" '\"") for v in value.strip("[]").split(",")]
            else:  # a list on the following lines (tag: / task: of a group)
                found_names = []
                for follow in lines[i + 1:]:
                    item = re.match(r"^\s+-\s+([\w.\-]+)\s*$", follow)
                    if not item:
                        break
                    found_names.append(item.group(1))
                if found.group(1) == "task":  # a group's member list: the group file is not their definition
                    continue
            for name in found_names:
                names.setdefault(name, []).append(str(path))
    return names


def _data_problem(task: str, data: Dict[str, Any], where: str) -> Optional[str]:
    """Why the task's data would not be found offline, or None."""
    source = data.get("dataset_path")
    if source is None:
        return None  # a custom_dataset or a group: nothing to check here
    if str(source) in LOCAL_BUILDERS:
        files = (data.get("dataset_kwargs") or {}).get("data_files")
        listed = files.values() if isinstance(files, dict) else [files]
        paths = [p for v in listed for p in (v if isinstance(v, list) else [v]) if p]
        missing = [p for p in paths if not Path(p).exists()]
        if not paths:
            return f"task {task!r} ({where}) reads `dataset_path: {source}` but names no dataset_kwargs.data_files"
        if missing:
            return f"task {task!r} ({where}): data file {missing[0]!r} does not exist (relative paths are read from the directory the eval job starts in; use absolute ones)"
        return None
    if Path(str(source)).expanduser().is_dir():
        return None
    return f"task {task!r} ({where}) reads its data from the Hugging Face Hub (dataset_path: {source}); compute nodes are offline: {HOW_TO_LOCAL}"


def check_tasks(tasks: List[str], allow_hub: bool) -> List[str]:
    """Problems with eval.harness.tasks, each naming the task (empty: every task can run offline)."""
    problems = []
    registry = None
    for task in tasks:
        task = str(task)
        if task in BUNDLED:
            continue
        if is_path(task):
            path = Path(task).expanduser()
            if not path.is_file():
                problems.append(f"task YAML {task!r} does not exist")
                continue
            try:
                data = read_task_yaml(path)
            except (OSError, ValueError, yaml.YAMLError) as error:
                problems.append(f"task YAML {task!r} could not be read: {error}")
                continue
            found = None if allow_hub else _data_problem(data.get("task") or task, data, str(path))
            if found:
                problems.append(found)
            continue
        tasks_dir = lm_eval_tasks_dir()
        if tasks_dir is None:
            problems.append(f"task {task!r} is not bundled ({', '.join(BUNDLED)}) and lm-eval is not installed to "
                            "look it up: pip install -e '.[eval]'")
            continue
        registry = registry or _registry(str(tasks_dir))
        files = registry.get(task)
        if not files:
            problems.append(f"task {task!r} is neither bundled ({', '.join(BUNDLED)}), nor a path to a task YAML, "
                            f"nor in lm-eval's registry")
            continue
        if allow_hub:
            continue
        try:
            data = read_task_yaml(Path(files[0]))
        except (OSError, ValueError, yaml.YAMLError):
            data = {}
        found = _data_problem(task, data, f"lm-eval's {Path(files[0]).relative_to(tasks_dir)}")
        if found:
            problems.append(found)
        elif data.get("dataset_path") is None:  # a group or tag: its tasks' data are lm-eval's, on the Hub
            problems.append(f"task {task!r} is an lm-eval group or tag ({len(files)} file(s)) whose tasks read their data "
                            f"from the Hugging Face Hub; compute nodes are offline: {HOW_TO_LOCAL}")
    return problems


def task_names(tasks: List[str]) -> List[str]:
    """The names lm-eval reports each entry's results under (a YAML's `task:`)."""
    names = []
    for task in tasks:
        task = str(task)
        if is_path(task) and Path(task).expanduser().is_file():
            try:
                names.append(str(read_task_yaml(Path(task).expanduser()).get("task") or task))
            except (OSError, ValueError, yaml.YAMLError):
                names.append(task)
        else:
            names.append(task)
    return names


# ---------------------------------------------------------------- the bundled tasks
def bundled_rows(eval_file: str, tokenizer) -> List[Dict[str, str]]:
    """The eval split's last assistant turns as {prompt: the chat-templated conversation before it, answer}."""
    rows = []
    for line in Path(eval_file).read_text().splitlines():
        messages = json.loads(line).get("messages") if line.strip() else None
        if messages and messages[-1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": prompt, "answer": messages[-1]["content"]})
    return rows


def bundled_yaml(task: str, data_file: Path, eos: str, max_gen_toks: int) -> Dict[str, Any]:
    common = {
        "task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
        "metadata": {"version": 1.0},
    }
    if task == "tiny_tasks":
        # As the trainer's eval/accuracy: greedy, the answer compared without surrounding whitespace.
        return {**common, "output_type": "generate_until",
                "generation_kwargs": {"until": [eos], "max_gen_toks": max_gen_toks, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "regexes_to_ignore": [r"^\s+", r"\s+$"]}]}
    return {**common, "output_type": "loglikelihood", "doc_to_target": "{{answer}}" + eos,
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def write_bundled(tasks: List[str], out_dir: Path, tokenizer, max_gen_toks: int) -> List[Path]:
    """The bundled tasks among `tasks` as lm-eval YAMLs (and their data) in out_dir; their paths."""
    from launcher.bundled import resolve

    wanted = [t for t in tasks if t in BUNDLED]
    if not wanted:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "tiny_tasks.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in bundled_rows(resolve(BUNDLED_DATA), tokenizer))
    if not data.is_file() or data.read_text() != text:  # evals of several checkpoints may run at once
        write_text_atomic(data, text)
    paths = []
    for task in wanted:
        path = out_dir / f"{task}.yaml"
        write_text_atomic(path, yaml.safe_dump(bundled_yaml(task, data, tokenizer.eos_token, max_gen_toks), sort_keys=False))
        paths.append(path)
    return paths
