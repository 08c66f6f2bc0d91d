"""The code blocks of docs/guide/faithful.md run, in order, in one namespace."""


def test_faithful_guide_code_blocks_run(run_guide):
    namespace = run_guide("faithful", min_blocks=5)
    assert "convert_element_type" in namespace["message"]
