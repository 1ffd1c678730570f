"""MMLU (Hendrycks et al. 2021, https://arxiv.org/abs/2009.03300): 57 subjects of four-choice questions.

The original release, https://people.eecs.berkeley.edu/~hendrycks/data.tar, holds one CSV file per
subject and split, without a header: question, the four choices, the right letter. `mmlu_folder`
downloads it once into data/mmlu/ (dev/ and test/); any folder in that layout can be given instead:

    dev/{subject}_dev.csv      5 questions per subject: the k-shot examples
    test/{subject}_test.csv    14,042 questions in all: the ones scored

Two ways to ask, rendered exactly as lm-evaluation-harness's `mmlu` (letter) and `mmlu_continuation`
(cloze) tasks do, with `k` solved examples first, the subject's first k dev questions ("first_n"):

  letter   The following are multiple choice questions (with answers) about high school physics.\\n\\n
           {example question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: B\\n\\n      (k times)
           {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:
           continuations " A", " B", " C", " D"
  cloze    The following are questions (with answers) about high school physics.\\n\\n
           Question: {example question}\\nAnswer: {its right choice}\\n\\n                (k times)
           Question: {question}\\nAnswer:
           continuations " " + each choice's text

Letters ask the model to read the listed choices and name one, which small models cannot do (they score
at chance, 0.25); cloze scoring asks which answer text is likeliest after the question, which measures
what a small model knows (GPT-2 124M: 0.2557, 0-shot; docs/evaluation.md).
"""
import csv
import tarfile
from pathlib import Path

from ..files.fileio import atomic_write, download_file
from .multiple_choice import Question

MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
LETTERS = "ABCD"
FORMATS = ("letter", "cloze")
MAX_SHOTS = 5  # the dev split's questions per subject
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions")


def mmlu_folder(data_dir="data"):
    """data_dir/mmlu, with dev/ and test/ from the original release: downloaded and unpacked on first use
    (166 MB; only the dev and test CSV files are kept)."""
    folder = Path(data_dir) / "mmlu"
    if (folder / "test").is_dir():
        return folder
    archive = Path(data_dir) / "mmlu-data.tar"
    if not archive.is_file():
        download_file(MMLU_URL, archive, hint="Pass --data FOLDER with MMLU's dev/ and test/ CSV folders "
                                              "to use a local copy instead.")
    unpacked = folder.with_name("mmlu.partial")  # renamed to mmlu/ once complete
    try:
        with tarfile.open(archive) as tar:  # data/dev/x_dev.csv -> dev/x_dev.csv; nothing else is written
            for member in tar.getmembers():
                split = Path(member.name).parent.name
                if member.isfile() and member.name.endswith(".csv") and split in ("dev", "test"):
                    with atomic_write(unpacked / split / Path(member.name).name) as f:
                        f.write(tar.extractfile(member).read())
    except tarfile.TarError as e:
        raise ValueError(f"{archive}: not MMLU's tar archive ({e}); delete it to download it again") from None
    unpacked.rename(folder)
    archive.unlink()
    return folder


def read_split(path):
    """The rows of one subject's CSV file: (question, (four choices), index of the right one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMLU file not found: {path}")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, fields in enumerate(csv.reader(f), start=1):
                if len(fields) != 6 or fields[5].strip() not in LETTERS:
                    raise ValueError(f"{path}: line {line} is not MMLU's question,A,B,C,D,answer (A-D): "
                                     f"{fields!r:.80}")
                rows.append((fields[0], tuple(fields[1:5]), LETTERS.index(fields[5].strip())))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a UTF-8 CSV file ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


def subject_words(subject):
    return subject.replace("_", " ")


def render_letter(question, choices):
    """MMLU's letter layout: the question, the choices as "A. ...", and "Answer:"."""
    listed = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return f"{question.strip()}{listed}\nAnswer:"


def render_cloze(question):
    return f"Question: {question.strip()}\nAnswer:"


def mmlu_question(row, subject, form, shots=()):
    """A Question of one CSV row in `form` ("letter" or "cloze"), after the solved example rows `shots`."""
    if form not in FORMATS:
        raise ValueError(f"unknown MMLU format {form!r}; choose from: {', '.join(FORMATS)}")
    question, choices, answer = row
    if form == "letter":
        description = ("The following are multiple choice questions (with answers) about "
                       f"{subject_words(subject)}.")
        examples = "".join(f"{render_letter(q, c)} {LETTERS[a]}\n\n" for q, c, a in shots)
        return Question(f"{description}\n\n{examples}{render_letter(question, choices)}", tuple(LETTERS),
                        answer, group=subject)
    description = f"The following are questions (with answers) about {subject_words(subject)}."
    examples = "".join(f"{render_cloze(q)} {c[a]}\n\n" for q, c, a in shots)
    return Question(f"{description}\n\n{examples}{render_cloze(question)}", choices, answer, group=subject)


def shots_for(row, pool, k):
    """The first k rows of `pool` (the dev split) that are not `row` itself."""
    return [example for example in pool if example != row][:k]


def mmlu_questions(folder, form="letter", k=0, subjects=None):
    """The test questions of every subject in `folder` (or of `subjects`), each after k examples from its
    dev split; subjects in alphabetical order, questions in file order."""
    folder = Path(folder)
    if not 0 <= k <= MAX_SHOTS:
        raise ValueError(f"MMLU takes 0 to {MAX_SHOTS} examples (its dev split has {MAX_SHOTS} per subject), "
                         f"got {k}")
    if not (folder / "test").is_dir():
        raise FileNotFoundError(f"{folder}: no test/ folder of MMLU CSV files (the layout of {MMLU_URL})")
    found = sorted(path.name.removesuffix("_test.csv") for path in (folder / "test").glob("*_test.csv"))
    unknown = [s for s in (subjects or ()) if s not in SUBJECTS]
    if unknown:
        raise ValueError(f"unknown MMLU subject(s) {', '.join(unknown)}; the 57 are listed in "
                         f"minigpt/evaluate/mmlu.py")
    missing = [s for s in (subjects or ()) if s not in found]
    if missing:
        raise FileNotFoundError(f"{folder / 'test'}: no file for subject(s) {', '.join(missing)}")
    questions = []
    for subject in subjects or found:
        pool = read_split(folder / "dev" / f"{subject}_dev.csv") if k else []
        for row in read_split(folder / "test" / f"{subject}_test.csv"):
            shots = shots_for(row, pool, k)
            if len(shots) < k:
                raise ValueError(f"{folder / 'dev'}: {subject} has {len(shots)} examples other than the "
                                 f"question itself, fewer than the {k} asked for")
            questions.append(mmlu_question(row, subject, form, shots))
    return questions
