"""studies.reproduction names each run's loss: the paper's (eqs. 3-6) or the departure it takes."""

import pytest

from studies.reproduction import loss_name


@pytest.mark.parametrize("distill, name", [
    ({}, "paper"),  # the settings' defaults are eq. 5
    ({"zeta2_penalty": "step", "zeta2_measure": "relative_step", "output_kl_weight": 16.0, "exit_samples": 4,
      "frozen": ["embeddings"]}, "paper"),  # weighting, exits and procedure do not depart
    ({"zeta2_penalty": "rise"}, "zeta2 penalty rise"),
    ({"zeta2_penalty": "rise", "zeta2_measure": "cosine_distance"}, "zeta2 penalty rise; zeta2 measure cosine_distance"),
])
def test_the_loss_is_the_papers_unless_zeta2_departs(distill, name):
    assert loss_name(distill) == name
