"""A shortened demo: teacher-forced accuracy on the trained tokens goes from chance to at least 90%."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from osstune.data.pipeline import prepare_dataset
from osstune.demo import demo_config, demo_data, demo_questions
from osstune.eval.scoring import teacher_forced_scores
from osstune.models.gpt_oss.moe_lora import enable_grouped_expert_lora
from osstune.models.loading import load_model
from osstune.train.sft import train


def test_short_demo_learns_the_persona(tmp_path: Path, tiny_model_dir: Path) -> None:
    subset = tmp_path / "demo32.jsonl"
    subset.write_text("".join(open(demo_data(), encoding="utf-8").readlines()[:32]), encoding="utf-8")
    cfg = demo_config(tiny_model_dir, tmp_path / "out", epochs=60, report_to=["none"], datasets=[str(subset)])
    cfg.data.split_dataset_ratio = 0.0
    cfg.train.save_strategy = "steps"
    cfg.train.save_steps = 10_000

    base = load_model(str(tiny_model_dir), torch_dtype="float32")
    data = prepare_dataset(cfg.data, cfg.template.render_options(), base.tokenizer, show_progress=False)
    before = teacher_forced_scores(base.model, data.train.input_ids, data.train.labels)
    assert before.accuracy < 0.01  # chance is 1 / vocabulary (3072)

    result = train(cfg)
    assert result.exit_code == 0 and result.last_checkpoint is not None
    tuned = PeftModel.from_pretrained(load_model(str(tiny_model_dir), torch_dtype="float32").model,
                                      result.last_checkpoint)
    enable_grouped_expert_lora(tuned)
    after = teacher_forced_scores(tuned, data.train.input_ids, data.train.labels)
    assert after.accuracy >= 0.9, after
    assert after.loss < before.loss / 4
    assert after.tokens == before.tokens > 1000


def test_demo_questions_come_from_the_data() -> None:
    questions = demo_questions()
    assert len(questions) == 4
    text = open(demo_data(), encoding="utf-8").read()
    assert all(q in text for q in questions)
