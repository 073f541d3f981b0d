"""The extractive answerer: no generative model; quotes the retrieved passages' sentences, each run cited ``[n]``.

How an answer is chosen (issue 18):

- every prose sentence of the relevant passages (headings, synopses and code left out) is scored against the
  question by its own embedding, by its window's (itself with its neighbours: the thought it belongs to; the sum of
  their vectors), by its passage's retrieval score, by how much the *other* ranked passages agree with it (the mean
  of its best cosine to each one's sentences), by its page's vote (the scores of the page's other retrieved
  passages: a page many ranked passages come from is on the question's topic), by its page title's cosine to the
  question (the title names what the page is about; one short encode per distinct title), by its share of the
  question's informative words (each content word weighted by how rare it is among the candidate sentences: the
  word that tells them apart, "part" in "roll back part of a transaction", counts most), for a question that asks
  how to do something by whether it tells the reader what they can do ("Savepoints allow you to ..."), for a
  question that asks what a term is ("What is MVCC?") by whether it defines the term ("X is ...", "X stands for
  ...", "(expansion, X)", "known as X") and, when ``rank_weight`` is set, by its passage's rank in retrieval's order;
- the answer starts from the passage of the best sentence (the best passage), quoting its sentences that score
  close to the best in document order, each with its neighbour when that neighbour continues the thought;
- a sentence that cannot stand alone ("It ...", "This ...", "However, ...", "Without this option ...") is quoted
  with its predecessor, or not at all when the passage has none; a setting's, an option's or a flag's description
  comes with the name it describes (base.sentence_runs: "work_mem (integer): Sets ...");
- other passages add a sentence only when it scores close to the best and says something new;
- sources are the quoted passages only, in rank order; citations keep the passages' ranks ``[n]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pgsynapse.answerers.base import NOT_FOUND, Answer, Passage, Request, named, sentence_runs

# a sentence starting with one of these needs its predecessor: its subject (or the thought it goes on with) is there
_DANGLING = re.compile(
    r"^(?:it(?!(?:'s| is| was| may be| can be| will be)(?: \w+){1,2} (?:to|that)\b)|its|this|that|these|those|they|them|their|such|he|she|here|there|then|thus|hence|however|also|"
    r"otherwise|therefore|consequently|moreover|furthermore|additionally|instead|similarly|likewise|nevertheless|"
    r"nonetheless|but|and|or|so|yet|again|alternatively|accordingly|in (?:this|that|such|these|those|addition|"
    r"contrast|particular|other words|either case|both cases|this case|that case)|for (?:example|instance|this|that)|"
    r"as (?:a result|such|well|above|below|mentioned|noted|shown|described)|the (?:former|latter|above|same|"
    r"following|result)|on the other hand|note that|unlike)\b",
    re.IGNORECASE,
)
# a demonstrative among a sentence's first words ("Without this option ...", "Enabling this parameter ...", "All
# these functions ..."): what it points at was named by the sentence before ("such as" lists, it does not point back)
_POINTS_BACK = re.compile(r"^(?:\S+\s+){1,3}(?:this|these|those|such(?! as))\b", re.IGNORECASE)

_MARK = re.compile(r"\[\d+\]")
# a question asking how to do something ("How do I roll back part of a transaction?"), and a sentence that tells the
# reader what they can do ("Savepoints allow you to selectively discard parts of the transaction"): the answer to a
# how-to question is more often the second kind than a description of a command ("ROLLBACK rolls back the current
# transaction"), however alike their words
_HOW_TO_QUESTION = re.compile(r"^\s*(?:how (?:do|can|should|would) (?:i|you|we|one)|how to)\b", re.IGNORECASE)
_TELLS_HOW = re.compile(r"\b(?:you can|you could|you may|you should|you need to|allows? you to|lets? you|"
                        r"can be used to|is used to|are used to|use (?:the )?\S+ to|to do this|in order to)\b",
                        re.IGNORECASE)
# a question asking what a term is ("What is MVCC?", "What's a CTE?", "What does WAL stand for?"): its term, of a few
# words at most ("What is the difference between json and jsonb?" names no term)
_DEFINITION_QUESTION = re.compile(
    r"^\s*(?:what(?:'s| is| are)\s+(?:an?\s+|the\s+)?(?P<term>[^?]+?)"
    r"|what does\s+(?:an?\s+|the\s+)?(?P<abbr>[^?]+?)\s+(?:mean|stand for))\s*\??\s*$", re.IGNORECASE)
_TERM_WORDS = 4
# how a sentence defines a term T (each a format with the term's pattern): "T is ..." / "T stands for ...", "T (Its
# Expansion)" (not any words in parentheses: "OID (this is the same ...)", a setting's type "autovacuum (boolean)";
# nor an acronym after the words it stands for, "examining the visibility map (VM)": a mention more often than a
# definition), "(T)" / "(expansion, T)", "known as ... T"
_DEFINES = (r"^(?:(?:an?|the)\s+)?{t}\s+(?:is|are|stands for|means|refers to)\b",
            r"{t}\s+\((?:(?:the|an?)\s+)?(?-i:[A-Z])[\w-]*(?:\s+[\w-]+)+\)",
            r"\((?:[^()]*,\s*)?{t}\)",
            r"\b(?:called|known as|referred to as|short(?:hand)? for)\s+(?:\S+\s+){{0,5}}?{t}")
_WORD = re.compile(r"[a-z0-9_]+")
_STOP = frozenset(
    "a about an and any are as at be by can could do does doing for from how i if in into is it its me my of on or "
    "our should so than that the their them then there these they this those to use used using was we what when "
    "where which who why will with would you your".split())


def _stem(word: str) -> str:
    """A light suffix strip (parts -> part, rolling -> roll), enough to match a question's words in a sentence."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def terms(text: str) -> set[str]:
    """The content words of ``text``, lower case, stemmed, stop words left out."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP}


def defined_term(question: str) -> str | None:
    """The term ``question`` asks the meaning of ("What is a CTE?": "CTE"), or None when it asks something else."""
    m = _DEFINITION_QUESTION.match(question)
    term = m and (m["term"] or m["abbr"]).strip()
    return term if term and len(term.split()) <= _TERM_WORDS else None


def _definition(term: str) -> re.Pattern[str]:
    """What a sentence that defines ``term`` looks like (:data:`_DEFINES`): the term's words as written, singular or
    plural ("savepoints": "A savepoint is ..."), never part of a longer name ("GiST" in "SP-GiST")."""
    words = term.split()
    if len(words[-1]) > 3 and words[-1].lower().endswith("s"):
        words[-1] = words[-1][:-1]
    t = r"(?<![\w/-])" + r"[\s-]+".join(map(re.escape, words)) + r"(?:s|es)?(?![\w/-])"
    return re.compile("|".join(d.format(t=t) for d in _DEFINES), re.IGNORECASE)


def defines(term: str, sentence: str) -> bool:
    """Whether ``sentence`` says what ``term`` is: "X is ...", "X stands for ...", "X (expansion)", "expansion
    (X)", "(expansion, X)", "known as ... X"."""
    return bool(_definition(term).search(sentence))


def dangling(sentence: str) -> bool:
    """Whether ``sentence`` leans on its predecessor: it starts with a pronoun or a connective, or names its subject
    by pointing back at it ("Without this option ..."); never a description that comes with its name."""
    s = sentence.lstrip("(\"' ")
    return not named(s) and bool(_DANGLING.match(s) or _POINTS_BACK.match(s))


@dataclass
class _Sentence:
    passage: Passage
    index: int  # position among its passage's sentences
    text: str
    follows: bool  # right after its passage's previous sentence (nothing left out between them)
    own: float = 0.0  # cosine to the question
    score: float = 0.0  # own + window + passage + agreement, weighted
    vec: np.ndarray | None = None


class ExtractiveAnswerer:
    """Quotes the retrieved passages' best sentences, best passage first; never writes anything new.

    ``not_found_threshold``: a passage whose retrieval score is under it is not relevant; with none relevant the
    answer is :data:`NOT_FOUND`; but a passage that has every content word of the question (:func:`terms`) is relevant
    down to ``named_floor`` (None: never): MiniLM scores the page that defines an acronym low for the question that
    names it ("What is MVCC?": 0.33), and on the docs corpus this answered 3 of 26 short "What is X?" questions
    (bench/data/short_questions.jsonl) and changed no answer of the dev, user-worded, train or unanswerable sets
    (BENCHMARKS.md, session 33). ``max_sentences``: most sentences quoted (a dangling sentence's predecessor counts).
    ``min_sentence_score``: a sentence whose own cosine to the question is under it is never the answer's start.
    ``window_weight``, ``passage_weight``, ``agreement_weight``, ``page_weight``, ``title_weight``: how much a
    sentence's window, its passage's retrieval score, the other passages' agreement, its page's vote and its page
    title add to its own cosine (chosen on the tune half of the dev questions and 150 train questions:
    bench/answer_quality.py, BENCHMARKS.md). ``rank_weight``: a sentence adds ``rank_weight / rank`` of its
    passage, so retrieval's order (full text fused with the vectors, which the cosine alone does not see) counts
    too; off by default: with ``lexical_weight`` on, every rank weight tried (0.25-1) lowered the first citation
    on the tune sets. ``lexical_weight``: how much a sentence's share of the question's informative words adds
    (:meth:`_lexical`). ``how_to_weight``: what a sentence that tells the reader what they can do ("... allow you
    to ...", "you can ...", "use X to ...") adds when the question asks how to do something ("How do I ...?").
    Each chosen on the tune sets by bench/extractive_weights.py (BENCHMARKS.md). ``definition_weight``: what a
    sentence that defines the term adds when the question asks what a term is ("What is MVCC?": "... a multiversion
    model (Multiversion Concurrency Control, MVCC)" rather than "MVCC, by eschewing the locking methodologies ...";
    :func:`defined_term`, :func:`defines`); 0.75, the least of the best on the tune sets (0.75 and 1 alike, 0.5
    lower: 3 more of the 26 short questions start with the sentence that defines the term; BENCHMARKS.md, session
    35).
    ``keep_margin``: how close to the best score another sentence must be to be quoted too.
    """

    name = "extractive"
    # raised with every change to how an answer is chosen: answers cached by an earlier revision are not served
    # (answer_cache.settings_key); 2: the question's informative words (lexical_weight), code kept out of sentences;
    # 3: sentences that tell how, for how-to questions (how_to_weight); 4: a sentence pointing back at its subject
    # leans on its predecessor, and a description is quoted with the name it describes ("work_mem (integer): Sets
    # ...", base.sentence_runs); 5: a passage with every word of the question is relevant down to named_floor; 6:
    # sentences that define the term, for "What is X?" questions (definition_weight)
    revision = 6

    def __init__(self, encode, *, not_found_threshold: float = 0.35, max_sentences: int = 3,
                 min_sentence_score: float = 0.25, window_weight: float = 1.0, passage_weight: float = 2.0,
                 agreement_weight: float = 0.5, page_weight: float = 1.0, keep_margin: float = 0.15,
                 continue_similarity: float = 0.5, title_weight: float = 1.5, rank_weight: float = 0.0,
                 lexical_weight: float = 1.5, how_to_weight: float = 0.5, named_floor: float | None = 0.2,
                 definition_weight: float = 0.75) -> None:
        self.encode = encode
        self.not_found_threshold = not_found_threshold
        self.named_floor = named_floor
        self.max_sentences = max_sentences
        self.min_sentence_score = min_sentence_score
        self.window_weight = window_weight
        self.passage_weight = passage_weight
        self.agreement_weight = agreement_weight
        self.page_weight = page_weight
        self.continue_similarity = continue_similarity
        self.title_weight = title_weight
        self.rank_weight = rank_weight
        self.lexical_weight = lexical_weight
        self.how_to_weight = how_to_weight
        self.definition_weight = definition_weight
        self.keep_margin = keep_margin

    def answer(self, req: Request, on_delta=None) -> Answer:  # noqa: ARG002 - nothing to stream
        relevant = [p for p in req.passages if self._relevant(p, req.question)]
        if not relevant or req.query_vector is None:
            return Answer(NOT_FOUND, [])
        by_passage: dict[int, list[_Sentence]] = {}
        cands: list[_Sentence] = []
        for p in relevant:
            # a document's own footnote marks ("[7]") would read as citations
            sents = [_Sentence(p, i, " ".join(_MARK.sub("", s).split()), f) for i, (s, f) in enumerate(sentence_runs(p.text))]
            if sents:
                by_passage[p.rank] = sents
                cands.extend(sents)
        if cands:
            self._score(cands, by_passage, req.query_vector, req.question)
        # a sentence that leans on a predecessor the passage does not have (cut off, or code between) is never quoted,
        # nor one whose chain of predecessors is longer than an answer
        quotable = [c for c in cands if self._stands(self._with_predecessors(c, by_passage[c.passage.rank]))]
        if not quotable:  # no prose to quote (code, a table): the best passage itself
            best = relevant[0]
            return Answer(f"{' '.join(best.text.split())[:600]} [{best.rank}]", [best.as_source()])
        starts = [c for c in quotable if c.own >= self.min_sentence_score] or quotable
        top = max(starts, key=lambda c: c.score)
        picked = self._from_passage(top, by_passage[top.passage.rank])
        # other passages: a sentence close to the best that says something new
        for c in sorted(starts, key=lambda c: -c.score):
            if len(picked) >= self.max_sentences or c.score < top.score - self.keep_margin:
                break
            if c.passage.rank == top.passage.rank or any(c is p for p in picked):
                continue
            group = self._with_predecessors(c, by_passage[c.passage.rank])
            if len(picked) + len(group) > self.max_sentences or self._redundant(c, picked) or not self._stands(group):
                continue
            picked.extend(group)
        return self._render(picked)

    # -- scoring ---------------------------------------------------------------------------------
    def _score(self, cands: list[_Sentence], by_passage: dict[int, list[_Sentence]], query: np.ndarray,
               question: str) -> None:
        titles = list(dict.fromkeys(c.passage.title or "" for c in cands)) if self.title_weight else []
        vecs = np.asarray(self.encode([c.text for c in cands] + titles), dtype=np.float32)
        svecs = vecs[: len(cands)]
        title_score = {t: float(v @ query) for t, v in zip(titles, vecs[len(cands):])}
        # a sentence's window (itself with its neighbours): the normalised sum of their vectors, no second encode
        wvecs = svecs.copy()
        for i, c in enumerate(cands):
            if i > 0 and cands[i - 1].passage is c.passage and c.follows:
                wvecs[i] += svecs[i - 1]
            if i + 1 < len(cands) and cands[i + 1].passage is c.passage and cands[i + 1].follows:
                wvecs[i] += svecs[i + 1]
        wvecs /= np.linalg.norm(wvecs, axis=1, keepdims=True)
        own = svecs @ query
        # the ranked passages' vote for a page: the scores of the page's other retrieved passages
        page = {}
        for sents in by_passage.values():
            p = sents[0].passage
            page[p.source] = page.get(p.source, 0.0) + p.score
        agree = np.zeros(len(cands), dtype=np.float32)
        ranks = np.array([c.passage.rank for c in cands])
        if self.agreement_weight and len(by_passage) > 1:
            sim = svecs @ svecs.T
            others = list(by_passage)
            for i in range(len(cands)):
                best = [sim[i, ranks == r].max() for r in others if r != ranks[i]]
                agree[i] = float(np.mean(best))
        lexical = self._lexical(cands, question) if self.lexical_weight else np.zeros(len(cands))
        how_to = self.how_to_weight if _HOW_TO_QUESTION.match(question) else 0.0
        term = defined_term(question) if self.definition_weight else None
        definition = _definition(term) if term else None
        for i, c in enumerate(cands):
            c.own, c.vec = float(own[i]), svecs[i]
            c.score = (c.own + self.window_weight * float(wvecs[i] @ query)
                       + self.passage_weight * c.passage.score + self.agreement_weight * float(agree[i])
                       + self.page_weight * (page[c.passage.source] - c.passage.score)
                       + self.title_weight * title_score.get(c.passage.title or "", 0.0)
                       + self.rank_weight / c.passage.rank + self.lexical_weight * float(lexical[i])
                       + (how_to if _TELLS_HOW.search(c.text) else 0.0)
                       + (self.definition_weight if definition and definition.search(c.text) else 0.0))

    def _relevant(self, p: Passage, question: str) -> bool:
        """Whether passage ``p`` may answer ``question``: its score is over the threshold, or over the floor with
        every content word of the question."""
        if p.score >= self.not_found_threshold:
            return True
        if self.named_floor is None or p.score < self.named_floor:
            return False
        words = terms(question)
        return bool(words) and words <= terms(p.text)

    @staticmethod
    def _lexical(cands: list[_Sentence], question: str) -> np.ndarray:
        """Each sentence's share of the question's informative words: the question's content words it has, each
        weighted by its rarity among the candidate sentences (idf), over the question's total. A word every
        passage has ("transaction") counts little; the one that tells them apart ("part") counts most."""
        sents = [terms(c.text) for c in cands]
        n = len(sents)
        idf = {}
        for t in terms(question):
            df = sum(t in s for s in sents)
            if df:
                idf[t] = float(np.log((n + 1) / df))
        total = sum(idf.values())
        if not total:
            return np.zeros(n)
        return np.array([sum(w for t, w in idf.items() if t in s) / total for s in sents])

    def _redundant(self, c: _Sentence, picked: list[_Sentence], limit: float = 0.85) -> bool:
        return any(float(c.vec @ p.vec) >= limit for p in picked)

    # -- choosing ------------------------------------------------------------------------------
    def _with_predecessors(self, c: _Sentence, sents: list[_Sentence]) -> list[_Sentence]:
        """``c`` with the predecessors it leans on, in document order."""
        group = [c]
        while dangling(group[0].text) and group[0].follows and group[0].index > 0:
            group.insert(0, sents[group[0].index - 1])
        return group

    def _stands(self, group: list[_Sentence]) -> bool:
        """Whether a sentence with its predecessors can be quoted: it starts with its subject, within the limit."""
        return not dangling(group[0].text) and len(group) <= self.max_sentences

    def _from_passage(self, top: _Sentence, sents: list[_Sentence]) -> list[_Sentence]:
        """The best sentence with its predecessors, then its passage's sentences that continue the thought (a
        dangling follower) or score close to the best, in document order."""
        chosen = {s.index for s in self._with_predecessors(top, sents)}
        # the sentences after it that go on with its thought: leaning on it, or on its topic
        prev = top
        while prev.index + 1 < len(sents) and len(chosen) < self.max_sentences:
            nxt = sents[prev.index + 1]
            if not nxt.follows or not (dangling(nxt.text) or float(nxt.vec @ prev.vec) >= self.continue_similarity):
                break
            chosen.add(nxt.index)
            prev = nxt
        for s in sorted(sents, key=lambda s: -s.score):
            if len(chosen) >= self.max_sentences or s.score < top.score - self.keep_margin:
                break
            if s.index in chosen or s.own < self.min_sentence_score:
                continue
            chain = self._with_predecessors(s, sents)
            group = {g.index for g in chain} - chosen
            if self._stands(chain) and len(chosen) + len(group) <= self.max_sentences:
                chosen |= group
        return [sents[i] for i in sorted(chosen)]

    @staticmethod
    def _render(picked: list[_Sentence]) -> Answer:
        """Runs of one passage's sentences cited once ``[n]`` at their end; sources: the cited passages in rank order."""
        parts: list[str] = []
        for i, s in enumerate(picked):
            last = i + 1 == len(picked) or picked[i + 1].passage.rank != s.passage.rank
            parts.append(f"{s.text} [{s.passage.rank}]" if last else s.text)
        cited = {s.passage.rank: s.passage for s in picked}
        return Answer(" ".join(parts), [cited[r].as_source() for r in sorted(cited)])
