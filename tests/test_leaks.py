"""Many shared-memory calls leave the agent's descriptors and mappings flat."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from lookout_edge.protocol import pb2, pb2_grpc
from lookout_edge.shm import SHM_DIR, OwnedSegment

from .conftest import IMAGE_BYTES, WIDTH, AgentProcess, make_image, mapped_regions, open_fds, shm_request

CALLS = 10_000
WORKERS = 8


def test_ten_thousand_shared_memory_calls(agent_process, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    agent: AgentProcess = agent_process(
        "--start-model", "seg", "--workers", str(WORKERS), "--queue-size", str(WORKERS)
    )
    agent.wait_ready()
    size = IMAGE_BYTES
    with OwnedSegment.create(2 * size) as segment, grpc.insecure_channel(agent.address) as channel:
        stub = pb2_grpc.EdgeAgentStub(channel)
        while (
            stub.DescribeModel(pb2.DescribeModelRequest(model_component="seg")).model_description.status != 2
        ):
            pass
        segment.array()[:size] = make_image(red=4).reshape(-1)
        request = shm_request("seg", segment, mask_offset=size)
        # Warm up with concurrent calls so that every gRPC worker thread exists, with its
        # stack and malloc arena: the pool grows lazily, which is not a leak.
        warm_up = [threading.Thread(target=lambda: [stub.DetectAnomalies(request) for _ in range(300)])
                   for _ in range(WORKERS)]  # fmt: skip
        for thread in warm_up:
            thread.start()
        for thread in warm_up:
            thread.join()
        fds_before, files_before, anonymous_before = open_fds(agent.pid), *mapped_regions(agent.pid)
        for _ in range(CALLS):
            assert stub.DetectAnomalies(request).detect_anomaly_result.is_anomalous
        fds_after, files_after, anonymous_after = open_fds(agent.pid), *mapped_regions(agent.pid)
        assert fds_after <= fds_before, (fds_before, fds_after)
        # Every shared-memory mapping is file-backed: their number must not move at all.
        assert files_after == files_before, (files_before, files_after)
        # Anonymous regions: glibc caches the stacks of gRPC's short-lived threads and adds
        # malloc arenas on contention, both bounded by design; a per-call leak would add
        # thousands.
        assert anonymous_after <= anonymous_before + 8, (anonymous_before, anonymous_after)
        with open(f"/proc/{agent.pid}/maps") as maps:
            assert segment.name not in maps.read()  # no mapping of the client's segment is left
        assert (SHM_DIR / segment.name[1:]).exists()
        mask_row = segment.array()[size : size + WIDTH * 3].reshape(WIDTH, 3)
        assert (mask_row == (255, 0, 0)).all()
        del mask_row
    assert agent.stop() == 0
