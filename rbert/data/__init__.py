from rbert.data.glue import GlueDataModule, read_table
from rbert.data.tasks import TaskSpec

__all__ = ["GlueDataModule", "TaskSpec", "read_table"]
