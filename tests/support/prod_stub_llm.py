"""A production-length test double: an OpenAI-compatible server that answers like a large model following the prompt.

``stub_llm.StubLLM`` writes short word salads cut to the JSON schema, which hides every fault of length,
token budget and filtering (issue 28). This server (the same HTTP machinery, :meth:`StubLLM.reply`
overridden) reads each example prompt as a model would and answers:

* at the **lengths** it asks for: "at least N words" -> N to 1.3 N words, "5 to 15 words", "less than 5
  words", "very short", a sentence / phrase / passage; labels of one to three words;
* in the **languages** it asks for (18 word banks; Chinese and Japanese without spaces), a bitext S1 in the
  source language and S2/S3 in the target one; asked to translate into the same language, it copies S1,
  as a model does;
* English as running prose with the function-word phrases real text has ("there is no", "one of the",
  "a man is"), so filters that match common phrases show here;
* about 1 % of answers not JSON and about 4 % the type's one duplicate answer; brainstorms as distinct tasks;
* grounded generation (``prompts/grounded.py``): a config answer valid under its schema (the candidate
  persona sharing most words with the passage), and a query of the asked length and language whose English
  words come from the passage;
* within the request's ``max_tokens``: an answer longer than that (tokens = UTF-8 bytes / 4) is cut there
  with ``finish_reason = "length"``, as vLLM does.

Deterministic: the answer is a function of the messages, the request's seed and the stub's ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from typing import Any

from support.stub_llm import StubLLM

EN_SUBJECTS = (
    "a man|a woman|the committee|one of the engineers|the city council|a small team|the new policy|"
    "most of the students|the report|a local farmer|the museum|our research group|the company|a young doctor|"
    "the river|the government|many families|the old bridge|each participant|the software"
).split("|")
EN_VERBS = (
    "is looking at|has changed|will review|describes|depends on|was built near|is trying to improve|"
    "has never seen|reported on|is responsible for|tends to ignore|can explain|was founded on|measured|"
    "is waiting for|helped to fund|argued against|carefully studied|is playing with|wrote about"
).split("|")
EN_OBJECTS = (
    "the price of bread|a new water system|the results of the survey|a long list of complaints|the harbour|"
    "the quality of the air|an unusual pattern in the data|the history of the region|a broken window|"
    "the main road|the cost of housing|a set of simple rules|the annual budget|a rare kind of bird|"
    "the school garden|the energy bill|a guitar on the stage|the local election|a map of the valley|"
    "the safety of the workers"
).split("|")
EN_TAILS = (
    "in the morning|after the storm|at the same time|for the first time|in front of the station|"
    "because there is no other option|as far as we know|during the last ten years|without any help|"
    "in most of the cases|on the other hand|at the end of the day|in a very short time|"
    "according to the latest figures|while the others were waiting"
).split("|")
EN_OPENERS = (
    "However,|In practice,|There is no doubt that|It is clear that|For example,|As a result,|Today,|"
    "In other words,|At first,|Some people say that|It is worth noting that|Meanwhile,"
).split("|")

#: common words per language (function words make the language identifiable, content words vary the text)
BANKS: dict[str, str] = {
    "Chinese": "我们 的 是 在 这个 一个 有 他们 没有 因为 所以 可以 已经 时候 城市 学校 工作 问题 "
    "发展 经济 社会 文化 历史 科学 技术 研究 政府 公司 市场 人民 生活 环境 教育 医院 朋友 家庭 今天 "
    "明天 非常 重要 需要 认为 知道 开始 继续 提高 解决",
    "Japanese": "私 は の が を に で と も です ます した ない この その 日本 学校 会社 仕事 "
    "問題 時間 東京 先生 学生 友達 家族 電車 天気 料理 映画 音楽 研究 経済 社会 環境 技術 今日 "
    "明日 とても 大切 考えて 思います 始めました",
    "Spanish": "el la los las de que y en un una por con para es son está fue muy pero también "
    "porque cuando ciudad gobierno trabajo escuela familia historia agua tiempo mundo país empresa "
    "mercado ciencia desarrollo sociedad nuevo grande importante siempre todos nuestra",
    "French": "le la les des de du que et en un une pour avec dans est sont était très mais aussi "
    "parce quand ville gouvernement travail école famille histoire eau temps monde pays entreprise "
    "marché science développement société nouveau grand important toujours tous notre",
    "German": "der die das und ist nicht mit von zu den für auf ein eine sich auch werden wurde "
    "sehr aber weil wenn Stadt Regierung Arbeit Schule Familie Geschichte Wasser Zeit Welt Land "
    "Unternehmen Markt Wissenschaft Entwicklung Gesellschaft neue große wichtig immer alle unsere",
    "Russian": "и в не на что он с как это по но из у за его они мы было очень также потому "
    "когда город правительство работа школа семья история вода время мир страна компания рынок "
    "наука развитие общество новый большой важный всегда все наша",
    "Portuguese": "o a os as de que e em um uma por com para é são está foi muito mas também "
    "porque quando cidade governo trabalho escola família história água tempo mundo país empresa "
    "mercado ciência desenvolvimento sociedade novo grande importante sempre todos nossa",
    "Italian": "il la gli le di che e in un una per con è sono era molto ma anche perché quando "
    "città governo lavoro scuola famiglia storia acqua tempo mondo paese azienda mercato scienza "
    "sviluppo società nuovo grande importante sempre tutti nostra della degli",
    "Korean": "나는 우리는 그리고 하지만 그래서 있습니다 없습니다 합니다 했습니다 학교 회사 사람 "
    "시간 문제 정부 도시 가족 역사 경제 사회 문화 기술 연구 환경 교육 오늘 내일 매우 중요한 새로운 "
    "많은 이것은 그것은 에서 으로 에게 대한 위해",
    "Arabic": "في من على إلى أن هذا هذه التي الذي كان مع عن لا ما هو هي المدينة الحكومة العمل "
    "المدرسة العائلة التاريخ الماء الوقت العالم البلد الشركة السوق العلم التنمية المجتمع جديد كبير "
    "مهم دائما جميع لكن أيضا",
    "Hindi": "है के में की को से और का एक यह पर भी नहीं लिए था कि वह हम शहर सरकार काम स्कूल "
    "परिवार इतिहास पानी समय दुनिया देश कंपनी बाजार विज्ञान विकास समाज नया बड़ा महत्वपूर्ण हमेशा सभी "
    "लेकिन क्योंकि जब",
    "Dutch": "de het een en van in is dat op te met voor niet zijn was maar ook omdat wanneer "
    "stad regering werk school familie geschiedenis water tijd wereld land bedrijf markt wetenschap "
    "ontwikkeling samenleving nieuwe grote belangrijk altijd alle onze",
    "Polish": "i w nie na się że z do jest to jak po ale także ponieważ kiedy był bardzo miasto "
    "rząd praca szkoła rodzina historia woda czas świat kraj firma rynek nauka rozwój społeczeństwo "
    "nowy duży ważny zawsze wszyscy nasza",
    "Turkish": "ve bir bu da için ile olarak çok daha ama çünkü ne zaman değil var yok şehir "
    "hükümet iş okul aile tarih su zaman dünya ülke şirket pazar bilim gelişme toplum yeni büyük "
    "önemli her zaman bütün bizim",
    "Vietnamese": "và của là có trong cho với một những các được không này người thành phố chính "
    "phủ công việc trường học gia đình lịch sử nước thời gian thế giới đất nước công ty thị trường "
    "khoa học phát triển xã hội mới lớn quan trọng luôn luôn tất cả chúng tôi",
    "Indonesian": "dan yang di ke dari ini itu dengan untuk tidak ada adalah akan juga karena "
    "ketika kota pemerintah pekerjaan sekolah keluarga sejarah air waktu dunia negara perusahaan "
    "pasar ilmu pembangunan masyarakat baru besar penting selalu semua kami",
    "Swedish": "och i att det som en på är av för med till inte den har var men också eftersom "
    "när stad regering arbete skola familj historia vatten tid värld land företag marknad vetenskap "
    "utveckling samhälle nya stora viktig alltid alla vår",
}
NO_SPACES = {"Chinese", "Japanese"}
SENTENCE_END = {"Chinese": "。", "Japanese": "。", "Hindi": "।", "Arabic": "."}
LANGUAGE_ORDER = ["English", *BANKS]

_AT_LEAST = re.compile(r"at least (\d+) words")
_RANGE = re.compile(r"(\d+) to (\d+) words")
_LESS_THAN = re.compile(r"less than (\d+) words")
_IN_LANGUAGE = re.compile(r"(?:should be|are all strings) in (\w+)")
_BITEXT = re.compile(r"one (\w+) in (\w+) and two \w+ in (\w+)")
_UNIT = re.compile(r"Write a (\w+) triple")


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def english(rng: random.Random, n_words: int) -> str:
    """Running English prose of about ``n_words`` words."""
    sentences, count = [], 0
    while count < n_words:
        parts = [rng.choice(EN_SUBJECTS), rng.choice(EN_VERBS), rng.choice(EN_OBJECTS)]
        if rng.random() < 0.6:
            parts.append(rng.choice(EN_TAILS))
        if rng.random() < 0.3:
            parts.insert(0, rng.choice(EN_OPENERS))
        if rng.random() < 0.25:
            parts.append(f"in {rng.randint(1950, 2024)}")
        sentence = " ".join(parts)
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        count += len(sentence.split())
    return _cut_words(" ".join(sentences), n_words)


def _cut_words(text: str, n_words: int) -> str:
    words = text.split()
    return " ".join(words[:n_words]).rstrip(",") + ("" if words[n_words - 1 : n_words] == words[-1:] else ".")


def prose(language: str, rng: random.Random, n_words: int) -> str:
    """About ``n_words`` words in ``language`` (a Chinese or Japanese "word" is one bank entry, no spaces)."""
    n_words = max(1, n_words)
    if language not in BANKS:
        return english(rng, n_words)
    bank = BANKS[language].split()
    end = SENTENCE_END.get(language, ".")
    joiner = "" if language in NO_SPACES else " "
    sentences, count = [], 0
    while count < n_words:
        k = min(rng.randint(5, 12), n_words - count) or 1
        words = [rng.choice(bank) for _ in range(k)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(2, 2024)))
        sentence = joiner.join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + end)
        count += k
    return joiner.join(sentences) if language in NO_SPACES else " ".join(sentences)


def _words(low: int, high: int, rng: random.Random) -> int:
    return rng.randint(low, max(low, high))


def _language(prompt: str) -> str:
    found = _IN_LANGUAGE.search(prompt)
    return found[1] if found and found[1] in LANGUAGE_ORDER else "English"


def _doc_words(prompt: str, rng: random.Random) -> int:
    found = _AT_LEAST.search(prompt)
    n = int(found[1]) if found else 150
    return _words(n, math.ceil(1.3 * n), rng)


def _query_words(prompt: str, rng: random.Random) -> int:
    if found := _RANGE.search(prompt):
        return _words(int(found[1]), int(found[2]), rng)
    if found := _LESS_THAN.search(prompt):
        return _words(2, int(found[1]) - 1, rng)
    if "at least 10 words" in prompt:
        return _words(10, 25, rng)
    return _words(8, 25, rng)


UNIT_WORDS = {"phrase": (2, 6), "sentence": (8, 20), "passage": (60, 140)}


def example(name: str, prompt: str, rng: random.Random) -> dict[str, str]:
    """The answer a model following ``prompt`` writes for task type ``name``."""
    lang = _language(prompt)
    if name == "retrieval":
        n = _doc_words(prompt, rng)
        return {
            "user_query": prose(lang, rng, _query_words(prompt, rng)).rstrip(".。") + "?",
            "positive_document": prose(lang, rng, n),
            "hard_negative_document": prose(lang, rng, _words(n, math.ceil(1.2 * n), rng)),
        }
    if name == "classification":
        if found := _LESS_THAN.search(prompt):
            n = _words(3, int(found[1]) - 1, rng)
        elif found := _AT_LEAST.search(prompt):
            n = _words(int(found[1]), math.ceil(1.3 * int(found[1])), rng)
        else:
            n = _words(10, 30, rng)
        label = prose(lang, rng, rng.randint(1, 2)).rstrip(".。।")
        misleading = prose(lang, rng, rng.randint(1, 2)).rstrip(".。।")
        if misleading.casefold() == label.casefold():
            misleading += " " + prose(lang, rng, 1).rstrip(".。।")
        return {"input_text": prose(lang, rng, n), "label": label, "misleading_label": misleading}
    if name in ("short_short", "long_long"):
        if name == "long_long":
            n = _doc_words(prompt, rng)
            return {"input": prose(lang, rng, n), "positive_document": prose(lang, rng, _words(n, n + 60, rng))}
        return {"input": prose(lang, rng, _words(2, 8, rng)), "positive_document": prose(lang, rng, _words(6, 20, rng))}
    unit = (_UNIT.search(prompt) or [None, "sentence"])[1]
    low, high = UNIT_WORDS.get(unit, UNIT_WORDS["sentence"])
    n = _words(low, high, rng)
    if name == "bitext":
        found = _BITEXT.search(prompt)
        src, tgt = (found[2], found[3]) if found else ("English", "German")
        s1 = prose(src, rng, n)
        s2 = s1 if src == tgt and rng.random() < 0.87 else prose(tgt, rng, n)  # "translated" into itself
        return {"S1": s1, "S2": s2, "S3": prose(tgt, rng, n)}
    s1 = prose(lang, rng, n)
    return {"S1": s1, "S2": s1.rstrip(".。") + " " + prose(lang, rng, 2), "S3": prose(lang, rng, n)}


def brainstorm(prompt: str, rng: random.Random, schema: dict[str, Any]) -> dict[str, list[str]]:
    """Distinct one-sentence tasks, as many as the schema's maxItems."""
    n = schema["properties"]["tasks"].get("maxItems", 6)
    kind = prompt.split("useful ")[-1].split(" tasks")[0] if "useful " in prompt else "matching"
    tasks = []
    while len(tasks) < n:
        topic = english(rng, rng.randint(6, 10)).rstrip(".").lower()
        task = f"Given a question about {topic}, find {kind} texts that answer it"
        if task not in tasks:
            tasks.append(task + ".")
    return {"tasks": tasks}


_PASSAGE = re.compile(r"Passage:\n(.*?)\n\n(?:Candidate characters|Requirements):", re.S)
_CANDIDATE = re.compile(r"^(\d+)\. (.*)$", re.M)
_QUERY_LANGUAGE = re.compile(r"The query is in (\w+)\.")
_WORD = re.compile(r"[A-Za-z][A-Za-z_]{3,}")


def grounded_config(prompt: str, rng: random.Random, schema: dict[str, Any]) -> dict[str, str]:
    """A model's config answer: the candidate character sharing most words with the passage, a question type
    and a difficulty from the schema's choices."""
    passage = set(w.lower() for w in _WORD.findall((_PASSAGE.search(prompt) or [None, ""])[1]))
    block = prompt.split("Candidate characters:\n", 1)[-1].split("\n\n", 1)[0]
    candidates = _CANDIDATE.findall(block)
    overlap = [(len(passage & {w.lower() for w in _WORD.findall(text)}), -int(n), n) for n, text in candidates]
    fields = schema["properties"]
    return {
        "persona": max(overlap)[2] if overlap else rng.choice(fields["persona"]["enum"]),
        "question_type": rng.choice(fields["question_type"]["enum"]),
        "difficulty": rng.choice(fields["difficulty"]["enum"]),
    }


def grounded_query(prompt: str, rng: random.Random) -> dict[str, str]:
    """A query of the asked length and language about the passage: in English its words come from the passage
    (as a model asking about it would use them), in another language from that language's bank."""
    n = _query_words(prompt, rng)
    found = _QUERY_LANGUAGE.search(prompt)
    language = found[1] if found and found[1] in LANGUAGE_ORDER else "English"
    if language != "English":
        words = prose(language, rng, n).rstrip(".。").split(" ")
        return {"query": " ".join(words[:n])}  # (Chinese and Japanese: one run without spaces)
    words = _WORD.findall((_PASSAGE.search(prompt) or [None, ""])[1]) or english(rng, n).split()
    start = rng.randrange(max(1, len(words) - n))
    query = " ".join(words[start : start + n]) or english(rng, n)
    return {"query": query[0].upper() + query[1:]}


class ProdStubLLM(StubLLM):
    """The stub server answering at production lengths (see the module docstring)."""

    def __init__(self, seed: int = 0, invalid_per_mille: int = 10, duplicate_per_mille: int = 40, **kwargs: Any):
        super().__init__(**kwargs)
        self.seed, self.invalid_per_mille, self.duplicate_per_mille = seed, invalid_per_mille, duplicate_per_mille
        self.truncated = 0  # answers cut at max_tokens

    def reply(self, body: dict[str, Any]) -> tuple[str, str, int]:
        messages = body.get("messages", [])
        prompt = str(messages[-1].get("content", "")) if messages else ""
        spec = (body.get("response_format") or {}).get("json_schema") or {}
        name, schema = spec.get("name", "free"), spec.get("schema") or {}
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        draw = int(hashlib.sha256(f"{self.seed}\x1f{body.get('seed')}\x1f{key}".encode()).hexdigest()[:8], 16)
        if draw % 1000 < self.invalid_per_mille:
            text = "Here is the example you asked for, written as a short paragraph instead of JSON."
        elif name.endswith("_brainstorm"):
            text = json.dumps(brainstorm(prompt, _rng(self.seed, key, "b"), schema), ensure_ascii=False)
        elif name == "grounded_config":
            text = json.dumps(grounded_config(prompt, _rng(self.seed, key, "c"), schema))
        elif name == "grounded_query":
            text = json.dumps(grounded_query(prompt, _rng(self.seed, key, "q")), ensure_ascii=False)
        else:
            duplicate = draw % 1000 >= 1000 - self.duplicate_per_mille
            rng = _rng(self.seed, name, "duplicate") if duplicate else _rng(self.seed, key, body.get("seed"))
            prompt_for = _duplicate_prompt(prompt) if duplicate else prompt
            text = json.dumps(example(name, prompt_for, rng), ensure_ascii=False)
        raw = text.encode()
        tokens = math.ceil(len(raw) / 4)
        limit = body.get("max_tokens")
        if limit and tokens > limit:
            with self._lock:
                self.truncated += 1
            return raw[: 4 * limit].decode(errors="ignore"), "length", limit
        return text, "stop", tokens


def _duplicate_prompt(prompt: str) -> str:
    """The one prompt all duplicates of a type and language answer: the request's languages, fixed lengths
    (so the duplicate stays a valid answer of the request and is the same text every time)."""
    if found := _BITEXT.search(prompt):
        return f"Write a sentence triple with one sentence in {found[2]} and two sentences in {found[3]}"
    return f"Write a sentence triple. All values should be in {_language(prompt)}. At least 100 words. 5 to 15 words."
