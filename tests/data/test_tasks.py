"""Task contract tests, parametrised over every registered task, plus loader error reporting."""
import json
import sys
import types
from pathlib import Path

import pytest

from latentreason.data import answers, tasks
from latentreason.data.base import SHARED_DATA, TASKS, DataError, Example, Task, build_task
from latentreason.registry import RegistryError

from tests.conftest import needs_data  # noqa: E402
BUILTIN = ["aqua", "arith", "gsm8k", "gsm8k-aug", "multiplication-4x4", "multiplication-5x5", "prosqa"]
SPLITS = [(name, split) for name in TASKS.names() for split in TASKS.get(name).splits]
# Small generated train splits keep the overlap checks fast; the exclusion logic is the same.
SMALL = {"prosqa": {"train_size": 300}, "multiplication-4x4": {"train_size": 3000},
         "multiplication-5x5": {"train_size": 3000}}


def _wrong_answer(task: Task, ex: Example) -> str:
    """A plausible but wrong answer in the task's own format."""
    if task.answer_kind == "number":
        return answers.normalize_number(str(answers.to_number(ex.answer) + 1))
    if task.answer_kind == "choice":
        return "B" if ex.answer != "B" else "C"
    if ex.options:  # ProsQA: name the other offered concept
        subject, target = ex.answer.rstrip(".").rsplit(" ", 1)
        return f"{subject} {next(o for o in ex.options if o != target)}."
    first = "1" if ex.answer[0] != "1" else "2"
    return first + ex.answer[1:]


def test_builtin_tasks_are_registered() -> None:
    assert set(BUILTIN) <= set(TASKS.names())


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(RegistryError) as err:
        build_task("gsm9k")
    message = str(err.value)
    assert "Did you mean 'gsm8k'" in message
    assert all(name in message for name in BUILTIN)


def test_unknown_split_and_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="no split 'test'.*train, valid"):
        build_task("gsm8k").load("test")
    with pytest.raises(ValueError, match="unknown option.*num_step.*valid options: max_operand"):
        build_task("arith", num_step=3)
    with pytest.raises(TypeError, match="num_steps='3'.*expected int"):
        build_task("arith", num_steps="3")
    with pytest.raises(ValueError, match="limit=-1"):
        build_task("arith").load("valid", limit=-1)


@needs_data
@pytest.mark.parametrize(("name", "split"), SPLITS)
def test_contract_round_trip(name: str, split: str) -> None:
    task = build_task(name)
    examples = task.load(split, limit=8)
    assert len(examples) == 8 and all(isinstance(ex, Example) for ex in examples)
    assert len({ex.id for ex in examples}) == 8
    assert all(ex.id.startswith(f"{name}-{split}-") for ex in examples)
    assert [ex.id for ex in task.load(split, limit=3)] == [ex.id for ex in examples[:3]]  # stable prefix
    for ex in examples:
        prompt, chain, answer = task.prompt(ex), task.chain_text(ex), task.answer_text(ex)
        assert ex.question and ex.answer and "####" not in ex.question + chain and ex.question in prompt
        assert answer == f"#### {ex.answer}"
        score = task.score(f"{chain} {answer}", ex)
        assert score.correct and score.correct_flexible, (ex.id, score)
        wrong = task.score(f"{chain} #### {_wrong_answer(task, ex)}", ex)
        assert not wrong.correct, (ex.id, wrong)
        # Strict needs the delimiter; flexible finds an answer left at the end of the text.
        bare = task.score(f"{chain}\n{ex.answer}", ex)
        assert bare.prediction is None and not bare.correct
        assert bare.correct_flexible, (ex.id, bare)


@needs_data
@pytest.mark.parametrize("name", [n for n in TASKS.names() if len(TASKS.get(n).splits) > 1])
def test_train_never_holds_a_heldout_question(name: str) -> None:
    task = build_task(name, **SMALL.get(name, {}))
    train = {tasks.norm_question(ex.question) for ex in task.load("train")}
    seen = set()
    for split in task.splits[1:]:
        held = {tasks.norm_question(ex.question) for ex in task.load(split)}
        assert held and not train & held and not seen & held
        seen |= held


@needs_data
def test_gsm8k_and_gsm8k_aug_share_the_heldout_questions() -> None:
    """GSM8K-Aug's 500 valid questions all occur in GSM8K train.jsonl: both tasks hold them out."""
    gsm, aug = build_task("gsm8k"), build_task("gsm8k-aug")
    valid, aug_valid = gsm.load("valid"), aug.load("valid")
    assert len(valid) == len(aug_valid) == 500
    assert [ex.question for ex in valid] == [ex.question for ex in aug_valid]
    assert [ex.answer for ex in valid] == [ex.answer for ex in aug_valid]  # "5,000" -> "5000" on both
    assert [ex.chains["equations"] for ex in valid] == [ex.chain for ex in aug_valid]
    assert len(gsm.load("train")) == len(aug.load("train")) == 7473 - 500
    aug_train = {tasks.norm_question(ex.question) for ex in aug.load("train")}
    assert not aug_train & {tasks.norm_question(ex.question) for ex in valid}


@needs_data
def test_gsm8k_chain_formats() -> None:
    ex = next(e for e in build_task("gsm8k").load("train") if e.question.startswith("Natalia sold clips"))
    assert ex.chain == ("Natalia sold 48/2 = 24 clips in May. "
                        "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert build_task("gsm8k", chain_format="equations").chain_text(ex) == "<<48/2=24>> <<48+24=72>>"
    assert ex.answer == "72"
    with pytest.raises(ValueError, match="available: equations, natural"):
        build_task("gsm8k", chain_format="latex").chain_text(ex)


def test_gsm8k_natural_steps_are_the_solution_lines(tmp_path) -> None:
    """Coconut's curriculum replaces steps: 46% of GSM8K's lines end without a full stop, and
    sentence splitting merged them (one row in three collapsed to a single step)."""
    row = {"question": "How many pages?", "answer": "He writes 3*2=<<3*2=6>>6 pages a week\nSo 6*2=<<6*2=12>>12 pages."
                                                    " Mr. Smith agrees\n#### 12"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    task = build_task("gsm8k", path=str(path), holdout=str(tmp_path / "none.txt"))
    (tmp_path / "none.txt").write_text("Another question?||<<1+1=2>> #### 2\n")
    ex = task.load("train")[0]
    assert ex.chain == "He writes 3*2=6 pages a week So 6*2=12 pages. Mr. Smith agrees"  # the text is unchanged
    assert task.chain_steps(ex) == ["He writes 3*2=6 pages a week", "So 6*2=12 pages. Mr. Smith agrees"]
    assert build_task("gsm8k", chain_format="equations").chain_steps(ex) == ["<<3*2=6>>", "<<6*2=12>>"]


@needs_data
def test_instructions_name_the_answer_format() -> None:
    for name in ("gsm8k", "gsm8k-aug", "aqua", "prosqa"):
        task = build_task(name)
        ex = task.load("valid", limit=1)[0]
        assert task.prompt(ex).startswith(task.instruction + "\n") and "'#### <" in task.instruction
    for name in ("multiplication-4x4", "arith"):
        task = build_task(name)
        ex = task.load("valid", limit=1)[0]
        assert task.prompt(ex) == ex.question


@needs_data
def test_aqua_prompt_lists_options_and_dev_alias() -> None:
    task = build_task("aqua", path=str(SHARED_DATA / "aqua" / "dev.json"))  # the file itself
    ex = task.load("dev", limit=1)[0]
    assert task.prompt(ex).endswith("Options: A)32400 B)6000 C)600 D)60000 E)10")
    assert ex.answer == "A" and task.score("#### 32400", ex).correct  # value instead of letter


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    file = tmp_path / name
    file.write_text("\n".join(lines) + "\n")
    return file


GSM_OK = json.dumps({"question": "Q one?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
PROSQA_OK = {"question": "Tom is a wumpus. Every wumpus is a lempus. Rex is a jompus. Is Tom a jompus or lempus?",
             "steps": ["Tom is a wumpus.", "Every wumpus is a lempus."], "answer": "Tom is a lempus.",
             "idx_to_symbol": ["Rex", "Tom", "wumpus", "lempus", "jompus"], "edges": [[1, 2], [2, 3], [0, 4]],
             "root": 1, "target": 3, "neg_target": 4}
AQUA_OK = {"question": "1+1?", "options": ["A)1", "B)2"], "rationale": "1+1=2", "correct": "B"}

MALFORMED = [  # (task, file name, lines, expected line/row marker, field)
    ("gsm8k", "train.jsonl", [GSM_OK, json.dumps({"question": "Q?", "answer": "no final line"})], ":2:", "'answer'"),
    ("gsm8k", "train.jsonl", [GSM_OK, GSM_OK, json.dumps({"answer": "#### 3"})], ":3:", "'question'"),
    ("gsm8k", "train.jsonl", [GSM_OK, json.dumps({"question": "Q?", "answer": "x\n#### many"})], ":2:", "'answer'"),
    ("gsm8k", "train.jsonl", [GSM_OK, "{not json"], ":2:", "not valid JSON"),
    ("gsm8k-aug", "valid.txt", ["Q?||<<1+1=2>> #### 2", "Q two?<<1+1=2>> #### 2"], ":2:", "'question'"),
    ("gsm8k-aug", "valid.txt", ["Q?||<<1+1=2>> 2 #### 2"], ":1:", "'chain'"),
    ("gsm8k-aug", "valid.txt", ["Q?||<<1+1=2>> 2"], ":1:", "'answer'"),
    ("aqua", "dev.json", [json.dumps(AQUA_OK), json.dumps({**AQUA_OK, "correct": "F"})], ":2:", "'correct'"),
    ("aqua", "dev.json", [json.dumps({**AQUA_OK, "options": ["1", "2"]})], ":1:", "'options'"),
    ("prosqa", "valid.json", [json.dumps([PROSQA_OK, {k: v for k, v in PROSQA_OK.items() if k != "steps"}])],
     "[1]", "'steps'"),
    ("prosqa", "valid.json", [json.dumps([{**PROSQA_OK, "target": 9}])], "[0]", "'target'"),
    ("prosqa", "valid.json", [json.dumps([{**PROSQA_OK, "idx_to_symbol": ["Rex", "Tom", 2, "lempus", "jompus"]}])],
     "[0]", "'idx_to_symbol'"),
    ("prosqa", "valid.json", [json.dumps([{**PROSQA_OK, "answer": "Tom is a jompus."}])], "[0]", "'answer'"),
    ("multiplication-4x4", "valid.txt", ["1 2 3 4 * 1 2 3 4||x #### 1 4 0 1 7 6 8 1", "1 2 3 * 1 2 3 4||x #### 1"],
     ":2:", "'question'"),
    ("multiplication-4x4", "valid.txt", ["1 2 3 4 * 1 2 3 4||x #### 1 4 5 1 1 6 2 9"], ":1:", "'answer'"),
]


@pytest.mark.parametrize(("name", "filename", "lines", "where", "field"), MALFORMED)
def test_malformed_rows_name_file_line_and_field(tmp_path, name, filename, lines, where, field) -> None:
    file = _write(tmp_path, filename, lines)
    split = "train" if name == "gsm8k" else "valid"
    with pytest.raises(DataError) as err:
        build_task(name, path=str(tmp_path)).load(split)
    message = str(err.value)
    assert f"{file}{where}" in message and field in message, message


def test_well_formed_temp_files_load(tmp_path) -> None:
    _write(tmp_path, "valid.json", [json.dumps([PROSQA_OK])])
    ex = build_task("prosqa", path=str(tmp_path)).load("valid")[0]
    assert ex.options == ("jompus", "lempus") and ex.chain == "Tom is a wumpus. Every wumpus is a lempus."
    _write(tmp_path, "valid.txt", ["1 2 3 4 * 1 2 3 4||x #### 1 4 0 1 7 6 8 1"])  # 4321 * 4321
    assert build_task("multiplication-4x4", path=str(tmp_path)).load("valid")[0].answer == "1 4 0 1 7 6 8 1"


def test_gsm8k_holdout_matches_whitespace_normalised_questions(tmp_path) -> None:
    rows = [{"question": f"How  many {i}?", "answer": f"<<{i}+0={i}>>{i}\n#### {i}"} for i in range(4)]
    _write(tmp_path, "train.jsonl", [json.dumps(r) for r in rows])
    holdout = _write(tmp_path, "valid.txt", ["How many 2? ||<<2+0=2>> #### 2"])
    task = build_task("gsm8k", path=str(tmp_path), holdout=str(holdout))
    assert [ex.id for ex in task.load("valid")] == ["gsm8k-valid-2"]
    assert [ex.id for ex in task.load("train")] == ["gsm8k-train-0", "gsm8k-train-1", "gsm8k-train-3"]


def test_gsm8k_falls_back_to_last_rows_without_holdout(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tasks, "_default_aug_valid", lambda: None)
    monkeypatch.setattr(tasks, "GSM8K_FALLBACK_VALID", 2)
    _write(tmp_path, "train.jsonl", [GSM_OK.replace("one", str(i)) for i in range(5)])
    task = build_task("gsm8k", path=str(tmp_path))
    assert [ex.id for ex in task.load("valid")] == ["gsm8k-valid-3", "gsm8k-valid-4"]
    assert len(task.load("train")) == 3


@needs_data
def test_generated_train_excludes_valid_questions(tmp_path) -> None:
    """Put the generator's own first train questions into a valid file: train must skip them."""
    first = build_task("multiplication-4x4", train_size=20).load("train")
    _write(tmp_path, "valid.txt", [f"{ex.question}||{ex.chain} #### {ex.answer}" for ex in first[:5]])
    train = build_task("multiplication-4x4", path=str(tmp_path), train_size=20).load("train")
    assert [ex.question for ex in train[:15]] == [ex.question for ex in first[5:]]


def test_missing_local_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        build_task("aqua", path=str(tmp_path / "nowhere" / "deeper")).load("valid")
    with pytest.raises(DataError, match="dev.json: no such file"):
        build_task("aqua", path=str(tmp_path)).load("valid")


def test_a_byte_order_mark_is_read_and_other_bytes_are_named(tmp_path) -> None:
    """A Windows tool's UTF-8 BOM was refused as bad JSON; bytes that are not UTF-8 raised a bare
    UnicodeDecodeError that named no file."""
    row = json.dumps({"question": "q?", "options": ["A)1", "B)2"], "rationale": "r", "correct": "A"})
    (tmp_path / "dev.json").write_bytes(b"\xef\xbb\xbf" + f"{row}\n".encode())  # one object per line
    assert len(build_task("aqua", path=str(tmp_path)).load("valid")) == 1
    (tmp_path / "dev.json").write_bytes(f"{row}\n".encode() + b"\xff\n")
    with pytest.raises(DataError, match=r"dev.json:2: not UTF-8 text"):
        build_task("aqua", path=str(tmp_path)).load("valid")


def test_hub_names_load_through_datasets(tmp_path, monkeypatch) -> None:
    calls = []
    holdout = _write(tmp_path, "valid.txt", ["Another question?||<<1+1=2>> #### 2"])

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "Q?", "answer": "<<2*3=6>>6\n#### 6"}] if "gsm" in name else [AQUA_OK]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ex = build_task("gsm8k", path="someone/gsm8k-mock", holdout=str(holdout)).load("train")[0]
    assert (ex.answer, ex.chains["equations"]) == ("6", "<<2*3=6>>")
    assert build_task("aqua", path="someone/aqua-mock").load("valid")[0].answer == "B"
    assert calls == [("someone/gsm8k-mock", "main", "train"), ("someone/aqua-mock", "raw", "validation")]


def test_hub_without_datasets_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        build_task("aqua", path="someone/aqua-missing").load("valid")


def test_arith_splits_are_disjoint_and_knobs_apply() -> None:
    task = build_task("arith", num_steps=2, train_size=50, valid_size=20, test_size=20, seed=3)
    train, valid, test = (task.load(s) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (50, 20, 20)
    assert all(len(ex.chain.split(" ")) == 2 for ex in train)
    assert task.prompt(valid[0]) == valid[0].question  # no instruction: short char-level prompts
    other = build_task("arith", num_steps=2, train_size=50, valid_size=20, test_size=20, seed=4)
    assert [e.question for e in other.load("valid")] != [e.question for e in valid]


def test_prosqa_solutions_are_every_path_to_the_answer_shortest_first():
    row = {"question": "Tom is a wumpus. Tom is a yumpus. Every wumpus is a lempus. Every yumpus is a rempus. "
                       "Every rempus is a lempus. Every lempus is a jompus. Rex is a jompus. Is Tom a lempus or zumpus?",
           "steps": ["Tom is a wumpus.", "Every wumpus is a lempus."], "answer": "Tom is a lempus.",
           "idx_to_symbol": ["Rex", "Tom", "wumpus", "lempus", "jompus", "yumpus", "rempus", "zumpus"],
           "edges": [[1, 2], [1, 5], [2, 3], [5, 6], [6, 3], [3, 4], [0, 4]], "root": 1, "target": 3, "neg_target": 7}
    ex = tasks.parse_prosqa(0, ("test row", row))
    task = build_task("prosqa")
    assert task.solutions(ex) == [
        "Tom is a wumpus. Every wumpus is a lempus.",
        "Tom is a yumpus. Every yumpus is a rempus. Every rempus is a lempus.",
    ]
    assert build_task("arith").solutions(Example("a", "1+2", "3", "1+2=3")) == ["1+2=3"]


# -- inputs a review found mishandled (each failed before its fix) ----------------------------------
def test_a_json_string_holding_a_unicode_line_separator_is_one_row(tmp_path) -> None:
    """JSON allows U+2028/U+2029 unescaped (ensure_ascii=False writers emit them); splitting the file
    with str.splitlines broke the row in two and lost the file."""
    row = {"question": "Tom has 2 apples\u2028and 3 pears.\u0085 How many?", "answer": "<<2+3=5>>5\n#### 5"}
    _write(tmp_path, "train.jsonl", [GSM_OK, json.dumps(row, ensure_ascii=False)])
    holdout = _write(tmp_path, "valid.txt", ["Something else?||<<1+1=2>> #### 2"])
    train = build_task("gsm8k", path=str(tmp_path), holdout=str(holdout)).load("train")
    assert [ex.question for ex in train][1] == row["question"]
    (tmp_path / "pipes").mkdir()
    _write(tmp_path / "pipes", "valid.txt", ["a\x0cb? c||<<1+1=2>> #### 2"])  # a form feed inside the question
    assert build_task("gsm8k-aug", path=str(tmp_path / "pipes")).load("valid")[0].question == "a\x0cb? c"


@pytest.mark.parametrize(("name", "filename", "text"), [
    ("gsm8k", "train.jsonl", ""), ("gsm8k-aug", "valid.txt", "\n\n"), ("prosqa", "valid.json", "[]"),
])
def test_an_empty_data_file_is_an_error_not_an_empty_split(tmp_path, name, filename, text) -> None:
    (tmp_path / filename).write_text(text)
    split = "train" if name == "gsm8k" else "valid"
    with pytest.raises(DataError, match=rf"{filename}: no rows"):
        build_task(name, path=str(tmp_path)).load(split)


def test_option_values_are_checked_when_the_task_is_built() -> None:
    for name, option in [("prosqa", {"train_size": -1}), ("prosqa", {"dev_size": -3}), ("arith", {"valid_size": -1}),
                         ("multiplication-4x4", {"train_size": -1})]:
        with pytest.raises(ValueError, match=rf"option {next(iter(option))}=-\d+ must be >= 0"):
            build_task(name, **option)
    for name, option in [("gsm8k", {"holdout": 5}), ("gsm8k", {"holdout": True}), ("gsm8k-aug", {"train_path": 5})]:
        with pytest.raises(TypeError, match=rf"option {next(iter(option))}=.* expected a path"):
            build_task(name, **option)
    with pytest.raises(ValueError, match="limit=-1"):
        build_task("mix").load("valid", limit=-1)  # returned 999 of 1000 rows


def test_a_train_file_missing_held_out_questions_says_what_valid_keeps(tmp_path, caplog) -> None:
    rows = [{"question": f"How many {i}?", "answer": f"<<{i}+0={i}>>{i}\n#### {i}"} for i in range(3)]
    _write(tmp_path, "train.jsonl", [json.dumps(r) for r in rows])
    holdout = _write(tmp_path, "valid.txt", ["How many 2?||<<2+0=2>> #### 2", "Not in train?||<<1+1=2>> #### 2"])
    with caplog.at_level("WARNING"):
        valid = build_task("gsm8k", path=str(tmp_path), holdout=str(holdout)).load("valid")
    assert len(valid) == 1 and "1 of the 2 held-out questions" in caplog.text and "valid keeps 1" in caplog.text


def test_a_mistyped_relative_file_is_a_missing_file_not_a_hub_dataset(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="g/trian.jsonl: no such file"):
        build_task("gsm8k", path="g/trian.jsonl").load("train")


def test_a_gold_number_with_misplaced_commas_is_an_error(tmp_path) -> None:
    """"12,5" became 125 (a correct "12.5" scored wrong), "1,0000" 10000: a gold that is not a
    number is refused, naming the row."""
    for bad in ("12,5", "1,0000", "3 4"):
        (tmp_path / "valid.txt").write_text(f"Q?||<<1+1=2>> #### {bad}\n")
        with pytest.raises(DataError, match=r"valid.txt:1: field 'answer'.*is not a number"):
            build_task("gsm8k-aug", path=str(tmp_path)).load("valid")
