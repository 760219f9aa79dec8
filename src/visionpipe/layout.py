"""Where every stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths of the pipeline's inputs and outputs under ``root``."""

    root: Path

    def prepared(self, task: str) -> Path:
        return self.root / "data" / "prepared" / task

    def prepare_report(self, task: str) -> Path:
        return self.root / "reports" / "prepare" / f"{task}.json"

    def data_stats(self, task: str) -> Path:
        """What prepare's splits hold (data/stats.py): stats.json, class_balance.json, plots/."""
        return self.root / "reports" / "prepare" / task

    def augmented(self, task: str) -> Path:
        return self.root / "data" / "augmented" / task

    def augment_preview(self, task: str) -> Path:
        return self.root / "reports" / "plots" / "augment" / f"{task}.png"

    def model_dir(self, model: str) -> Path:
        return self.root / "models" / model

    def model_file(self, model: str) -> Path:
        return self.model_dir(model) / "model.keras"

    def model_meta(self, model: str) -> Path:
        return self.model_dir(model) / "model.json"

    def checkpoints(self, model: str) -> Path:
        return self.model_dir(model) / "checkpoints"

    def export_dir(self, model: str) -> Path:
        return self.model_dir(model) / "export"

    def history(self, model: str) -> Path:
        return self.root / "reports" / "train" / model / "history.csv"

    def model_summary(self, model: str) -> Path:
        return self.root / "reports" / "train" / model / "summary.txt"

    def headline(self, model: str) -> Path:
        return self.root / "reports" / "headline" / f"{model}.json"

    def metrics(self, model: str) -> Path:
        return self.root / "reports" / "metrics" / f"{model}.json"

    def plots(self, model: str) -> Path:
        return self.root / "reports" / "plots" / model

    def emissions(self, model: str) -> Path:
        return self.root / "reports" / "emissions" / model

    def export_report(self, model: str) -> Path:
        return self.root / "reports" / "export" / f"{model}.json"

    def model_card(self, model: str) -> Path:
        return self.root / "reports" / "model_cards" / f"{model}.md"
