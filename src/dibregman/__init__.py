"""dibregman: one-step generators from diffusion teachers by Bregman density-ratio matching."""

from .api import distill, evaluate_run, read_run, sample, teacher_row, train_teacher
from .artifacts import load_generator
from .divergences import Divergence, from_h, get_divergence
from .run_folder import RunFolder
from .teachers import ModuleTeacher, Teacher, check_teacher, load_teacher
from .train.config import DistillConfig, TeacherConfig

__all__ = ["DistillConfig", "Divergence", "ModuleTeacher", "RunFolder", "Teacher", "TeacherConfig", "check_teacher",
           "distill", "evaluate_run", "from_h", "get_divergence", "load_generator", "load_teacher", "read_run",
           "sample", "teacher_row", "train_teacher"]
__version__ = "0.1.0"
