from pathlib import Path

from controlnet_lab.tables import job_number


def test_jobs_are_taken_in_launch_order_not_name_order():
    names = ["10_block=zero", "2_block=gauss", "0_block=single", "1_block=zero"]
    assert [p.name for p in sorted(map(Path, names), key=job_number)] == ["0_block=single", "1_block=zero", "2_block=gauss", "10_block=zero"]
