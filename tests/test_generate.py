"""Conditional generation: prompt templates laid over L positions, the Generator and
--mode=generate."""

import io
import json

import pytest

from conftest import train_config
from flmjax import evaluate, generate, train
from flmjax.data import tokenizers
from flmjax.errors import UsageError


class Chars(tokenizers.Tokenizer):
  """Characters as ids (their code points, ASCII), BOS 1, EOS 2, pad 0."""
  bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 128

  def encode_batch(self, texts):
    return [[ord(c) for c in text] for text in texts]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


def _show(item):
  """A layout as text: given characters, '_' written, '^' BOS, '$' EOS."""
  marks = {1: "^", 2: "$"}
  return "".join((marks.get(t, chr(t)) if g else "_")
                 for g, t in zip(item.given, item.tokens))


def test_templates_lay_prompts_out_like_training_examples():
  chars = Chars()
  continuation = generate.layout("ab", chars, 8)
  assert _show(continuation) == "^ab_____" and continuation.continuation == 3
  assert _show(generate.layout("{{}}xy", chars, 8)) == "^____xy$"
  assert _show(generate.layout("a{{2}}b{{}}c{{1}}d", chars, 12)) == "^a__b___c_d$"
  assert _show(generate.layout("a{{2}}b", chars, 8)) == "^a__b___"
  assert _show(generate.layout("a{{2}}bcd", chars, 7)) == "^a__bcd"  # fills L exactly
  assert _show(generate.layout([7, 8], chars, 5)).startswith("^") and \
      list(generate.layout([7, 8], chars, 5).tokens[1:3]) == [7, 8]
  # a segment's trailing spaces are dropped, its other spaces kept
  assert _show(generate.layout(" a {{2}} b  \n {{}} c ", chars, 16)) == "^ a__ b  \n___ c$"


def test_a_written_word_after_a_gpt2_segment_brings_its_own_space():
  """GPT-2's BPE puts a word's space in front of it: 'The history of ' alone ends in the
  lone-space token 220, which a written ' war' would follow ('The history of  war')."""
  gpt2 = tokenizers.GPT2Tokenizer(*tokenizers.gpt2_files(""))
  item = generate.layout("The history of {{}}", gpt2, 8)
  given = [int(t) for g, t in zip(item.given, item.tokens) if g]
  assert given == [gpt2.bos_id] + gpt2.encode_batch(["The history of"])[0] + [gpt2.eos_id]
  assert gpt2.decode(given[1:-1] + gpt2.encode_batch([" war"])[0]) == "The history of war"


def test_sentencepiece_text_right_after_a_gap_continues_the_written_word(prepared):
  """SentencePiece starts each text it encodes as a word ("▁", a space when decoded): the
  text after a placeholder follows what was written there as typed, glued to it or after a
  space."""
  sp = prepared.tokenizer

  def filled(prompt, words):
    """The text of `prompt` with its placeholders written as `words` (each encoded as a
    text of its own: a word's start) and EOS after them."""
    written = [i for word in words for i in sp.encode_batch([word])[0]]
    prompt = prompt.format(*(f"{{{{{len(sp.encode_batch([w])[0])}}}}}" for w in words))
    item = generate.layout(prompt, sp, 32)
    ids, fill = item.tokens.copy(), iter(written)
    ids[~item.given] = [next(fill, sp.eos_id) for _ in range(int((~item.given).sum()))]
    return generate.text_of(ids, item, sp)
  assert filled("The history of {}.", [" war"]) == "The history of war."
  assert filled("{}able to go", ["un"]) == "unable to go"
  assert filled("a {} b", [" war"]) == "a war b"
  assert filled("{} and{}", ["Salt", " pepper"]) == "Salt and pepper"


def test_a_result_is_cut_at_the_first_eos_written_after_a_continuation_template():
  chars, eos = Chars(), Chars.eos_id

  def show(prompt, seq_len, written):
    """The text of `written` (characters, '$' an EOS) in the written positions."""
    item = generate.layout(prompt, chars, seq_len)
    ids, fill = item.tokens.copy(), iter(written)
    for i in range(seq_len):
      if not item.given[i]:
        c = next(fill)
        ids[i] = eos if c == "$" else ord(c)
    return generate.text_of(ids, item, chars)
  assert show("ab", 8, "xy$z$") == "abxy"
  assert show("ab", 8, "$xyzw") == "ab"
  assert show("a{{2}}b", 8, "p$xy$") == "apbxy"  # an EOS in {{2}} is dropped
  assert show("a{{2}}b", 8, "pqx$y") == "apqbx"
  assert show("{{}}xy", 8, "p$rs") == "prsxy"  # and in a gap


@pytest.mark.parametrize("prompt, message", [
    ("abcdefg", "takes 8 of the model's L = 8 positions and leaves none"),
    ("abcdefgh", "takes 9 of the model's L = 8"),
    ("{{}}abcdef", "takes 9 of the model's L = 8"),
    ("a{{7}}", "takes 9 of the model's L = 8"),
    ("a{{x}}", "a placeholder is {{N}}"),
    ("a{{}}b{{}}", "at most once"),
    ("a{{0}}", "N > 0"),
    ("a {{ b", "other uses of {{ and }}"),
    ([7, 128], "token id 128 is not an id of the model's tokenizer [(]0 to 127[)]"),
    ([-1, 7], "token id -1 is not"),
])
def test_a_prompt_that_does_not_fit_or_parse_is_named(prompt, message):
  with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}")) as error:
    generate.layout(prompt, Chars(), 8)
  assert repr(prompt)[:20] in str(error.value)


def _read_prompts(**fields):
  config = train_config()
  config.generate.update(fields)
  return generate.read_prompts(config)


def test_prompts_come_from_the_config_a_file_or_standard_input(tmp_path, monkeypatch):
  assert _read_prompts(prompt="Once {{3}} a") == ["Once {{3}} a"]
  (tmp_path / "p.txt").write_text("first\n\n{{}} last\n")
  assert _read_prompts(prompts_file=str(tmp_path / "p.txt")) == ["first", "{{}} last"]
  monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
  assert _read_prompts(prompts_file="-") == ["from stdin"]
  # UTF-8 with a BOM (as some editors save it), lines ended by \r\n or \n only
  (tmp_path / "p.txt").write_bytes("\ufeffone\u2028two\r\nthree\x0cfour\n".encode())
  assert _read_prompts(prompts_file=str(tmp_path / "p.txt")) == ["one\u2028two",
                                                                "three\x0cfour"]
  for blank in ("", " \t"):  # a blank prompt is none, as a blank line of a file is
    with pytest.raises(UsageError, match="needs one of --config.generate.prompt=TEXT .*"
                       "standard input\\)\\.$"):
      _read_prompts(prompt=blank)
  with pytest.raises(UsageError, match="standard input\\), not both"):
    _read_prompts(prompt="a", prompts_file=str(tmp_path / "p.txt"))
  for source in ("-", str(tmp_path / "latin1.txt")):
    (tmp_path / "latin1.txt").write_bytes(b"ok\ncaf\xe9 {{}}\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok\ncaf\xe9 {{}}\n")))
    with pytest.raises(UsageError, match=f"prompts_file={source}: byte 6 is not UTF-8"):
      _read_prompts(prompts_file=source)
  # a malformed template, before any weights are loaded
  (tmp_path / "p.txt").write_text("fine\nbad {{0}}\n")
  with pytest.raises(UsageError, match=r"prompt 'bad \{\{0\}\}': a placeholder is"):
    _read_prompts(prompts_file=str(tmp_path / "p.txt"))
  with pytest.raises(UsageError, match="with a 5000-digit N asks for more positions"):
    _read_prompts(prompt="a {{" + "9" * 5000 + "}}")
  with pytest.raises(UsageError, match="generate.prompts_file=.*missing.txt: No such file"):
    _read_prompts(prompts_file=str(tmp_path / "missing.txt"))
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(UsageError, match="holds no prompt"):
    _read_prompts(prompts_file=str(tmp_path / "empty.txt"))


def test_a_workdir_that_is_a_file_is_refused_before_the_weights_are_loaded(tmp_path):
  config = train_config()
  config.generate.prompt, config.checkpoint = "a", str(tmp_path / "no weights here")
  (tmp_path / "file").write_text("")
  with pytest.raises(UsageError, match="--workdir=.*file is a file"):
    generate.generate_mode(config, str(tmp_path / "file"))


@pytest.mark.slow
def test_generate_mode_writes_one_line_per_prompt_in_order(tmp_path, capsys, monkeypatch,
                                                            prepared, teacher):
  """Five prompts in batches of two (the last padded): five results in order, each
  keeping its given text; token ids as a prompt; guidance; guidance for a model trained
  without conditions is refused."""
  config = train_config(steps=2)
  config.data.dir = str(prepared.path.parent)
  config.train.condition = "prefix,suffix,infill"
  config.model.condition_embedding = True
  train.train(config, str(tmp_path / "conditional"))
  prompts = ["the", "{{}} end.", "a {{2}} b", "x", "one two"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  config.checkpoint = str(tmp_path / "conditional")
  config.generate.update(prompts_file=str(tmp_path / "prompts.txt"), batch_size=2)
  config.sample.steps = 2
  capsys.readouterr()  # the training's progress lines
  results = generate.generate_mode(config, str(tmp_path / "out"))
  lines = [json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text()
           .splitlines()]
  assert lines == results and capsys.readouterr().out.count("\n") == 5
  assert [r["prompt"] for r in results] == prompts
  assert all(r["steps"] == 2 and r["seconds"] > 0 for r in results)
  calls, sampler_for = [], evaluate.sampler_for

  def counted(*args):
    name, sample = sampler_for(*args)
    return name, lambda *a: calls.append(1) or sample(*a)
  monkeypatch.setattr(evaluate, "sampler_for", counted)
  generator = generate.Generator(config.checkpoint, config, batch_size=2)
  with pytest.raises(UsageError, match="leaves none to write"):
    generator.generate(["x " * 100])
  assert not calls  # refused before the sampler was compiled (its first call)
  tokenizer = generator.tokenizer

  def round_trip(text):
    return tokenizer.decode(tokenizer.encode_batch([text])[0])
  assert results[0]["text"].startswith(round_trip("the"))
  assert results[1]["text"].endswith(round_trip(" end."))
  assert results[2]["text"].startswith(round_trip("a")) and round_trip(" b") in results[2][
      "text"][len(round_trip("a")):]
  assert results[3]["text"].startswith(round_trip("x"))
  assert results[4]["text"].startswith(round_trip("one two"))
  from_ids = generator.generate([tokenizer.encode_batch(["x"])[0]])
  assert from_ids[0]["text"].startswith(round_trip("x"))

  config.sample.guidance = 2.0
  guided = generate.Generator(config.checkpoint, config, batch_size=2).generate(["x {{}} y"])
  assert guided[0]["text"].startswith(round_trip("x"))

  with pytest.raises(UsageError, match=f"{teacher} was trained without them"):
    generate.Generator(teacher, config)  # (baseline weights: tests/test_baselines.py)
  load = evaluate.load

  def without_dropout(*args):  # the unconditional denoiser never trained
    record, *rest = load(*args)
    record["config"]["train"]["condition_dropout"] = 0.0
    return record, *rest
  monkeypatch.setattr(evaluate, "load", without_dropout)
  with pytest.raises(UsageError, match="train.condition_dropout > 0 .* was trained without"):
    generate.Generator(config.checkpoint, config)
