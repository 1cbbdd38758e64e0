"""Multi-hop questions over a small generated knowledge base stated in the prompt.

Why generated: no data set can be downloaded here, and a fixed one would be memorised. Each
problem invents its own world from made-up words (organisms, kinds, habitats with a
temperature), states it as short facts in shuffled order with distractors, and asks a question
that needs 2 hops (difficulty 1: "Where does X live?": X -> its kind -> the kind's habitat) or
3 hops (difficulty >= 2: "How warm is it where X lives?": ... -> the habitat's temperature).
The answer is a word or an integer, compared exactly after lower-casing.

Committed format (training.lm_rl.committed): the thoughts follow the hops, one fact per line;
the short state commits only the answer, the long state also the bridge entities (kind, kind2,
..., home). The follow-up asks for a bridge entity ("What kind is X?" / "Where does X live?"), which the
thoughts hold and only the long state commits.
"""
from __future__ import annotations

import random
import re

from training.lm_rl.committed import FORMAT_INSTRUCTION, CommittedTask
from training.lm_rl.tasks.base import Problem, TaskFamily, check_difficulty

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_WORD = re.compile(r"[a-z0-9-]{1,24}")
_TEMPERATURE_RANGE = (5, 40)


def _words(rng: random.Random, count: int) -> list[str]:
    """`count` distinct made-up consonant-vowel-consonant words."""
    words: list[str] = []
    while len(words) < count:
        word = rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(_CONSONANTS)
        if word not in words:
            words.append(word)
    return words


class ScienceQATask(CommittedTask, TaskFamily):
    """Facts in the prompt, a question of ``difficulty + 1`` hops, a follow-up about a bridge entity."""

    name = "science_qa"

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        check_difficulty(difficulty)
        # Kinds form `levels` layers ("a is a kind of b" between layers); the top layer lives
        # somewhere; from difficulty 2 on habitats have a temperature and the question asks it.
        levels = max(1, difficulty - 1)
        n_organisms, per_level, n_habitats = 2 + min(difficulty, 3), 2, 2
        names = _words(rng, n_organisms + per_level * levels + n_habitats)
        organisms = names[:n_organisms]
        layers = [names[n_organisms + per_level * i : n_organisms + per_level * (i + 1)] for i in range(levels)]
        habitats = names[n_organisms + per_level * levels :]
        parent = {o: rng.choice(layers[0]) for o in organisms}
        for lower, upper in zip(layers, layers[1:]):
            parent.update({k: rng.choice(upper) for k in lower})
        home_of = {k: rng.choice(habitats) for k in layers[-1]}
        temperature = {h: rng.randint(*_TEMPERATURE_RANGE) for h in habitats}
        facts = [f"{child} is a kind of {kind}" for child, kind in parent.items()]
        facts += [f"{k} lives in {home_of[k]}" for k in layers[-1]]
        if difficulty >= 2:
            facts += [f"{h} is {temperature[h]} degrees" for h in habitats]
        rng.shuffle(facts)
        subject = rng.choice(organisms)
        chain = [subject]
        for _ in range(levels):
            chain.append(parent[chain[-1]])
        home = home_of[chain[-1]]
        thoughts = [f"{child} is a kind of {kind}" for child, kind in zip(chain, chain[1:])]
        thoughts.append(f"{chain[-1]} lives in {home}")
        bridges = [("kind" if i == 1 else f"kind{i}", kind, f"What kind is {child}?")
                   for i, (child, kind) in enumerate(zip(chain, chain[1:]), start=1)]
        if difficulty >= 2:
            question, answer = f"How warm is it where {subject} lives?", str(temperature[home])
            thoughts.append(f"{home} is {temperature[home]} degrees")
            bridges.append(("home", home, f"Where does {subject} live?"))
        else:
            question, answer = f"Where does {subject} live?", home
        key, followup_answer, followup = rng.choice(bridges)
        return Problem(
            task=self.name,
            prompt=f"{'. '.join(facts)}. {question}\n{FORMAT_INSTRUCTION}",
            answer=answer,
            difficulty=difficulty,
            meta={
                "subject": subject,
                # The solution's hops, one per thought line (difficulty + 1 of them).
                "chain": tuple(thoughts),
                "thoughts": thoughts,
                "state_short": [("ans", answer)],
                "state_long": [(k, v) for k, v, _ in bridges] + [("ans", answer)],
                "followup": followup,
                "followup_answer": followup_answer,
                "followup_key": key,
            },
        )

    def parse_answer(self, answer_text: str) -> str | None:
        text = answer_text.strip().lower()
        return text if _WORD.fullmatch(text) else None

    def is_correct(self, problem: Problem, parsed: str) -> bool:
        return parsed == problem.answer.lower()
