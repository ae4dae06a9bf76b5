from rbert.data.glue import GlueDataModule, read_table
from rbert.data.tasks import TaskSpec
from rbert.data.text import TextDataModule

__all__ = ["GlueDataModule", "TaskSpec", "TextDataModule", "read_table"]
