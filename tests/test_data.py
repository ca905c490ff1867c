"""How files become records: a .txt file is a document whose line breaks are text, not record ends."""

from __future__ import annotations

import json

from llmopt.data import load_texts, token_stream
from llmopt.recipe import DatasetSpec

DOC = ("The first paragraph is wrapped\nat a fixed width, as prose in a\ntext file often is.\n"
       "\n\n"
       "A second paragraph,\r\nwith Windows line ends.\n"
       "   \n"
       "Third, after a line of spaces.\n")
PARAGRAPHS = ["The first paragraph is wrapped\nat a fixed width, as prose in a\ntext file often is.",
              "A second paragraph,\nwith Windows line ends.", "Third, after a line of spaces."]


def test_a_text_file_is_split_only_at_blank_lines_and_keeps_its_line_breaks(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(DOC.encode())
    assert load_texts(DatasetSpec(path=path)) == PARAGRAPHS


def test_end_of_sequence_tokens_mark_paragraphs_not_lines(tmp_path, tiny_model):
    """One EOS per record: the line breaks inside a paragraph stay newline tokens, so the stream of a
    .txt file is the stream of the same paragraphs given as JSON lines."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    txt, jsonl = tmp_path / "doc.txt", tmp_path / "doc.jsonl"
    txt.write_bytes(DOC.encode())
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in PARAGRAPHS))
    stream = token_stream(tokenizer, load_texts(DatasetSpec(path=txt)))
    assert stream.count(tokenizer.eos_token_id) == len(PARAGRAPHS)
    assert stream == token_stream(tokenizer, load_texts(DatasetSpec(path=jsonl)))
    assert "\n" in tokenizer.decode(stream), "line breaks inside a paragraph are kept as text"
