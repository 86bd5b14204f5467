import pytest
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a test that builds an Accelerator (TRL's trainers
    turn bf16 on) would otherwise fix mixed precision for every later in-process run."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
