import pytest

from exporter.attribution.deviceids import DeviceRef, is_gpu_resource, parse_device_id

UUID = "GPU-8a4e1b2c-1111-2222-3333-444455556666"
MIG = "MIG-3f9c2d1e-aaaa-bbbb-cccc-ddddeeeeffff"


@pytest.mark.parametrize(
    ("device_id", "ref"),
    [
        (UUID, DeviceRef(uuid=UUID)),
        (f"{UUID}::0", DeviceRef(uuid=UUID)),  # time-slicing / MPS replica
        (f"{UUID}::17", DeviceRef(uuid=UUID)),
        (MIG, DeviceRef(uuid=MIG)),
        (f"{MIG}::3", DeviceRef(uuid=MIG)),
        (f"MIG-{UUID}/7/0", DeviceRef(parent_uuid=UUID, gpu_instance_id=7)),  # pre-R470 MIG ids
        ("nvidia0", DeviceRef(minor_number=0)),  # GKE
        ("nvidia3/gi2", DeviceRef(minor_number=3, gpu_instance_id=2)),
        ("nvidia0/gi0/vgpu1", DeviceRef(minor_number=0, gpu_instance_id=0)),
        ("nvidia1/vgpu4", DeviceRef(minor_number=1)),
    ],
)
def test_known_device_id_formats(device_id: str, ref: DeviceRef) -> None:
    assert parse_device_id(device_id) == ref


@pytest.mark.parametrize("device_id", ["", "0", "gpu0", "GPU-", "abc-_-1", "nvidia", "nvidiaX/gi0", "MIG-GPU-x/1"])
def test_unknown_formats_are_not_guessed(device_id: str) -> None:
    assert parse_device_id(device_id) is None


@pytest.mark.parametrize(
    ("resource", "is_gpu"),
    [
        ("nvidia.com/gpu", True),
        ("nvidia.com/gpu.shared", True),
        ("nvidia.com/mig-1g.5gb", True),
        ("nvidia.com/mig-3g.20gb.shared", True),
        ("nvidia.com/gpumem", False),
        ("amd.com/gpu", False),
        ("cpu", False),
        ("example.com/nvidia.com/gpu", False),
    ],
)
def test_gpu_resources(resource: str, is_gpu: bool) -> None:
    assert is_gpu_resource(resource) is is_gpu
