"""The code blocks of docs/guide/influence.md run, in order, in one namespace."""


def test_influence_guide_code_blocks_run(run_guide):
    namespace = run_guide("influence", min_blocks=5)
    assert namespace["weights"].shape == (256,)
