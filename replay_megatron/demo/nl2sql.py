"""The demo's domain task: NL2SQL over generated SQLite databases (issue 7, item 1).

A database holds one or two tables built from four templates (employees, products, students, cities);
each table keeps a `name` key column plus a random subset of categorical and numeric columns, and every
table and column takes one of two names, so the model has to read the schema in the prompt. Questions come
from nine templates with gold SQL in a deliberately small grammar a tiny model can learn:

    SELECT COUNT(*) | AGG(col) | col FROM t [WHERE col = 'v' | col > n | col < n] [ORDER BY col DESC|ASC LIMIT 1]

Numeric columns hold distinct values per table, so ORDER BY ... LIMIT 1 has a unique answer.
"""
from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Category:
    """A categorical (TEXT) column: name variants, its values, the noun and the phrase a question uses."""

    names: tuple[str, ...]
    noun: str
    values: tuple[str, ...]
    phrase: str  # completes "How many employees are ..." with the value in {}


@dataclass(frozen=True)
class Measure:
    """A numeric (INTEGER) column with distinct values drawn from [low, high]."""

    names: tuple[str, ...]
    noun: str
    low: int
    high: int


@dataclass(frozen=True)
class TableTemplate:
    names: tuple[str, ...]
    plural: str
    singular: str
    keys: tuple[str, ...]  # values of the `name` column
    categories: tuple[Category, ...]
    measures: tuple[Measure, ...]


TEMPLATES: tuple[TableTemplate, ...] = (
    TableTemplate(
        ("employees", "staff"), "employees", "employee",
        tuple("alice brian carol david emma frank grace henry irene jacob karen laura mason nora oscar "
              "peter quinn ruth simon tessa".split()),
        (Category(("dept", "department"), "department",
                  ("sales", "engineering", "marketing", "finance", "support", "legal"), "in the {} department"),
         Category(("city", "office"), "city", ("paris", "rome", "oslo", "lima", "cairo", "tokyo"), "based in {}")),
        (Measure(("salary", "pay"), "salary", 30, 200), Measure(("age",), "age", 21, 65)),
    ),
    TableTemplate(
        ("products", "items"), "products", "product",
        tuple("lamp chair desk kettle radio camera drill sofa clock mug bike kite tent rug fan oven "
              "shelf stove piano helmet".split()),
        (Category(("category", "kind"), "category", ("tools", "toys", "books", "food", "garden", "music"),
                  "in the {} category"),
         Category(("brand", "maker"), "brand", ("acme", "zenith", "orbit", "nova", "apex", "vertex"), "made by {}")),
        (Measure(("price", "cost"), "price", 1, 500), Measure(("stock", "units"), "stock", 0, 300)),
    ),
    TableTemplate(
        ("students", "pupils"), "students", "student",
        tuple("amir bella chen dora elias fiona george hana ivan julia kofi lina marco nadia omar "
              "priya rafael sofia tomas wanda".split()),
        (Category(("major", "subject"), "major", ("math", "physics", "history", "art", "biology", "chemistry"),
                  "majoring in {}"),
         Category(("club", "team"), "club", ("chess", "drama", "robotics", "choir", "soccer", "debate"),
                  "in the {} club")),
        (Measure(("score", "grade"), "score", 0, 100), Measure(("credits",), "credits", 10, 240)),
    ),
    TableTemplate(
        ("cities", "towns"), "cities", "city",
        tuple("avalon brookfield cedarville dunmore eastport fairhaven glenwood hillcrest ironbridge "
              "kingsley lakeside millbrook newport oakridge pinecrest riverton springdale westfield".split()),
        (Category(("region", "zone"), "region", ("north", "south", "east", "west", "central"), "in the {} region"),
         Category(("climate",), "climate", ("dry", "humid", "cold", "mild"), "with a {} climate")),
        (Measure(("population", "residents"), "population", 5, 999), Measure(("area", "size"), "area", 10, 900)),
    ),
)

AGGREGATES = {"MAX": "highest", "MIN": "lowest", "SUM": "total", "AVG": "average"}


@dataclass
class Table:
    """One generated table: its template, chosen column names, and rows (name first)."""

    name: str
    template: TableTemplate
    categories: list[tuple[str, Category]]  # (column name, spec)
    measures: list[tuple[str, Measure]]
    columns: list[str]  # storage order; "name" first
    rows: list[dict[str, str | int]]

    def values(self, column: str) -> list[str | int]:
        return [r[column] for r in self.rows]


@dataclass
class Database:
    db_id: str
    tables: list[Table]

    def schema(self) -> str:
        """The compact schema put in every prompt, e.g. `staff(name, pay, dept) ; items(name, cost)`."""
        return " ; ".join(f"{t.name}({', '.join(t.columns)})" for t in self.tables)


def make_table(rng: random.Random, template: TableTemplate) -> Table:
    """A table from `template` with 1-2 categorical and 1-2 numeric columns and 6-12 rows."""
    cats = rng.sample(template.categories, rng.randint(1, len(template.categories)))
    meas = rng.sample(template.measures, rng.randint(1, len(template.measures)))
    categories = [(rng.choice(c.names), c) for c in cats]
    measures = [(rng.choice(m.names), m) for m in meas]
    others = [n for n, _ in categories + measures]
    rng.shuffle(others)
    n_rows = rng.randint(6, 12)
    rows: list[dict[str, str | int]] = [{"name": k} for k in rng.sample(template.keys, n_rows)]
    for col, c in categories:
        for r in rows:
            r[col] = rng.choice(c.values)
    for col, m in measures:
        for r, v in zip(rows, rng.sample(range(m.low, m.high + 1), n_rows)):
            r[col] = v
    return Table(rng.choice(template.names), template, categories, measures, ["name", *others], rows)


def make_database(rng: random.Random, db_id: str) -> Database:
    """A database of one or two tables from distinct templates."""
    templates = rng.sample(TEMPLATES, rng.randint(1, 2))
    return Database(db_id, [make_table(rng, t) for t in templates])


def write_sqlite(db: Database, path: Path) -> None:
    """Create `path` (must not exist) holding `db`'s tables and rows."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            for t in db.tables:
                types = {c: "TEXT" for c, _ in t.categories} | {c: "INTEGER" for c, _ in t.measures}
                cols = ", ".join(f"{c} {types.get(c, 'TEXT')}" for c in t.columns)
                conn.execute(f"CREATE TABLE {t.name} ({cols})")
                marks = ", ".join("?" for _ in t.columns)
                conn.executemany(f"INSERT INTO {t.name} VALUES ({marks})",
                                 [tuple(r[c] for c in t.columns) for r in t.rows])
    finally:
        conn.close()


def make_question(rng: random.Random, db: Database) -> tuple[str, str]:
    """One (question, gold SQL) about a random table of `db`, from one of the nine templates."""
    t = rng.choice(db.tables)
    tp = t.template
    kinds = ["count_all", "lookup"]
    if t.categories:
        kinds += ["count_eq", "list_eq"]
    if t.measures:
        kinds += ["agg_all", "list_cmp", "count_cmp", "argmax"]
    if t.categories and t.measures:
        kinds += ["agg_eq"]
    kind = rng.choice(kinds)
    if t.categories:
        ccol, cat = rng.choice(t.categories)
        value = rng.choice(t.values(ccol))
        where_eq, phrase = f"WHERE {ccol} = '{value}'", cat.phrase.format(value)
    if t.measures:
        mcol, meas = rng.choice(t.measures)
        agg = rng.choice(sorted(AGGREGATES))
    if kind == "count_all":
        return f"How many {tp.plural} are there?", f"SELECT COUNT(*) FROM {t.name}"
    if kind == "lookup":
        col, spec = rng.choice(t.categories + t.measures)
        key = rng.choice(t.values("name"))
        return (f"What is the {spec.noun} of the {tp.singular} {key}?",
                f"SELECT {col} FROM {t.name} WHERE name = '{key}'")
    if kind == "count_eq":
        return f"How many {tp.plural} are {phrase}?", f"SELECT COUNT(*) FROM {t.name} {where_eq}"
    if kind == "list_eq":
        return f"List the names of {tp.plural} {phrase}.", f"SELECT name FROM {t.name} {where_eq}"
    if kind == "agg_all":
        return (f"What is the {AGGREGATES[agg]} {meas.noun} of all {tp.plural}?",
                f"SELECT {agg}({mcol}) FROM {t.name}")
    if kind == "agg_eq":
        return (f"What is the {AGGREGATES[agg]} {meas.noun} of {tp.plural} {phrase}?",
                f"SELECT {agg}({mcol}) FROM {t.name} {where_eq}")
    if kind == "argmax":
        high = rng.random() < 0.5
        return (f"Which {tp.singular} has the {'highest' if high else 'lowest'} {meas.noun}?",
                f"SELECT name FROM {t.name} ORDER BY {mcol} {'DESC' if high else 'ASC'} LIMIT 1")
    # list_cmp / count_cmp: the threshold is a value of the column, so both directions are non-empty
    # unless it is the extreme, which the caller's non-empty check rejects.
    above = rng.random() < 0.5
    x = rng.choice(t.values(mcol))
    cond, op = ("above", ">") if above else ("below", "<")
    if kind == "list_cmp":
        return (f"List the names of {tp.plural} with {meas.noun} {cond} {x}.",
                f"SELECT name FROM {t.name} WHERE {mcol} {op} {x}")
    return (f"How many {tp.plural} have {meas.noun} {cond} {x}?",
            f"SELECT COUNT(*) FROM {t.name} WHERE {mcol} {op} {x}")


def prompt_text(db: Database, question: str) -> str:
    """The instruction prompt: schema then question, on one line."""
    return f"Schema: {db.schema()} . Question: {question}"
