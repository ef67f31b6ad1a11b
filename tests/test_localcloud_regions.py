"""Several regions in one local cloud, and copies between them.

One cloud serves every EC2 region, each taken from a request's SigV4 credential scope:
each has its own zones, its own AMI id for the image, its own key pairs, groups,
volumes and snapshots. CopySnapshot copies a snapshot (its image file too) from one
region into another by EC2's rules (pending for a while, tags only where asked,
encryption with a key of the destination region); a Manager per region copies a
snapshot across and reads its files back from a volume made of the copy there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from asyncstage.localcloud import LocalCloud
from tests.fixtures.cloud import ManagerFactory
from tests.patience import patient_client
from tests.test_realism_capacity import playing

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.localcloud,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root"),
]

OTHER = "eu-west-1"


@pytest.fixture(scope="module")
async def other(cloud: LocalCloud) -> AsyncIterator[Any]:
    """A raw client of the same cloud, signing for another region."""
    async with patient_client(**cloud.session_kwargs(OTHER)) as client:
        yield client


async def _completed(client: Any, snapshot_id: str, within: float = 60) -> dict[str, Any]:
    seen: list[str] = []
    with anyio.fail_after(within):
        while True:
            (snap,) = (await client.describe_snapshots(SnapshotIds=[snapshot_id]))["Snapshots"]
            seen.append(str(snap["Progress"]))
            if snap["State"] == "completed":
                return dict(snap, _progress=seen)
            assert snap["State"] == "pending", snap
            await anyio.sleep(0.05)


async def _volume(client: Any, zone: str) -> str:
    made = await client.create_volume(AvailabilityZone=zone, Size=1)
    return str(made["VolumeId"])


async def test_each_region_has_its_own_zones_image_and_records(
    cloud: LocalCloud, ec2: Any, other: Any
) -> None:
    zones = {
        z["ZoneName"] for z in (await other.describe_availability_zones())["AvailabilityZones"]
    }
    assert zones and all(z.startswith(OTHER) for z in zones), zones
    home_zones = (await ec2.describe_availability_zones())["AvailabilityZones"]
    assert all(z["ZoneName"].startswith(cloud.region) for z in home_zones)
    image = cloud.image_id_in(OTHER)
    assert image != cloud.image_id and cloud.image_id_in(cloud.region) == cloud.image_id
    images = (await other.describe_images(ImageIds=[image]))["Images"]
    assert images[0]["Name"] == cloud.image_name
    with pytest.raises(ClientError) as info:  # the home region's id is unknown there
        await other.describe_images(ImageIds=[cloud.image_id])
    assert info.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"

    await other.create_key_pair(KeyName="regional")
    try:
        assert "regional" not in {
            k["KeyName"] for k in (await ec2.describe_key_pairs())["KeyPairs"]
        }
        volume = await _volume(other, f"{OTHER}a")
        try:
            with pytest.raises(ClientError) as info:
                await ec2.describe_volumes(VolumeIds=[volume])
            assert info.value.response["Error"]["Code"] == "InvalidVolume.NotFound"
            assert (await other.describe_volumes(VolumeIds=[volume]))["Volumes"][0][
                "AvailabilityZone"
            ] == f"{OTHER}a"
            with pytest.raises(ClientError) as info:  # a zone of another region
                await other.create_volume(AvailabilityZone=f"{cloud.region}a", Size=1)
        finally:
            await other.delete_volume(VolumeId=volume)
    finally:
        await other.delete_key_pair(KeyName="regional")


async def test_a_region_that_ec2_does_not_have_is_refused(cloud: LocalCloud) -> None:
    async with patient_client(**cloud.session_kwargs("xx-nowhere-9")) as client:
        with pytest.raises(ClientError) as info:
            await client.describe_volumes()
    assert info.value.response["Error"]["Code"] == "AuthFailure"
    assert "xx-nowhere-9" in info.value.response["Error"]["Message"]


async def test_copy_snapshot_across_regions_by_ec2s_rules(
    cloud: LocalCloud, ec2: Any, other: Any
) -> None:
    volume = await _volume(ec2, f"{cloud.region}a")
    made: list[tuple[Any, str]] = []
    try:
        snap = await ec2.create_snapshot(
            VolumeId=volume,
            TagSpecifications=[
                {"ResourceType": "snapshot", "Tags": [{"Key": "source", "Value": "yes"}]}
            ],
        )
        source = str(snap["SnapshotId"])
        made.append((ec2, source))
        await _completed(ec2, source)

        plain = await other.copy_snapshot(
            SourceSnapshotId=source, SourceRegion=cloud.region, Description="plain"
        )
        made.append((other, plain["SnapshotId"]))
        copy = await _completed(other, plain["SnapshotId"])
        assert copy["_progress"][0] != "100%"  # pending with progress first
        assert not copy.get("Tags")  # tags only where asked
        assert copy["Encrypted"] is False and copy["Description"] == "plain"
        with pytest.raises(ClientError):  # not in the source region
            await ec2.describe_snapshots(SnapshotIds=[plain["SnapshotId"]])

        tagged = await other.copy_snapshot(
            SourceSnapshotId=source,
            SourceRegion=cloud.region,
            Encrypted=True,
            TagSpecifications=[
                {"ResourceType": "snapshot", "Tags": [{"Key": "copy", "Value": "yes"}]}
            ],
        )
        made.append((other, tagged["SnapshotId"]))
        copy = await _completed(other, tagged["SnapshotId"])
        assert {t["Key"]: t["Value"] for t in copy["Tags"]} == {"copy": "yes"}
        assert copy["Encrypted"] is True and f":{OTHER}:" in copy["KmsKeyId"]
        # a volume made from an encrypted snapshot is encrypted
        encrypted = await other.create_volume(
            AvailabilityZone=f"{OTHER}b", SnapshotId=tagged["SnapshotId"]
        )
        made.append((other, encrypted["VolumeId"]))
        assert encrypted["Encrypted"] is True

        # an encrypted snapshot copied back needs a key of the destination region
        with pytest.raises(ClientError) as info:
            await ec2.copy_snapshot(
                SourceSnapshotId=tagged["SnapshotId"],
                SourceRegion=OTHER,
                Encrypted=True,
                KmsKeyId=copy["KmsKeyId"],  # the key of the other region
            )
        assert info.value.response["Error"]["Code"] == "InvalidParameterValue"
        assert cloud.region in info.value.response["Error"]["Message"]
        with pytest.raises(ClientError) as info:  # KmsKeyId without Encrypted
            await ec2.copy_snapshot(
                SourceSnapshotId=tagged["SnapshotId"], SourceRegion=OTHER, KmsKeyId="alias/x"
            )
        assert info.value.response["Error"]["Code"] == "InvalidParameterDependency"
        back = await ec2.copy_snapshot(SourceSnapshotId=tagged["SnapshotId"], SourceRegion=OTHER)
        made.append((ec2, back["SnapshotId"]))
        copy = await _completed(ec2, back["SnapshotId"])
        assert copy["Encrypted"] is True and f":{cloud.region}:" in copy["KmsKeyId"]
        with pytest.raises(ClientError) as info:
            await other.copy_snapshot(
                SourceSnapshotId="snap-0123456789abcdef0", SourceRegion=cloud.region
            )
        assert info.value.response["Error"]["Code"] == "InvalidSnapshot.NotFound"
    finally:
        for client, resource in reversed(made):
            if resource.startswith("vol-"):
                await client.delete_volume(VolumeId=resource)
            else:
                await client.delete_snapshot(SnapshotId=resource)
        await ec2.delete_volume(VolumeId=volume)
    left = [p.name for p in (Path(cloud.state_dir) / "snapshots").glob("*.img")]
    assert not {r for _, r in made} & {n.removesuffix(".img") for n in left}


async def test_encryption_by_default_is_a_setting_of_each_region(
    cloud: LocalCloud, ec2: Any, other: Any
) -> None:
    made: list[tuple[Any, str]] = []
    await other.enable_ebs_encryption_by_default()
    try:
        assert (await other.get_ebs_encryption_by_default())["EbsEncryptionByDefault"]
        assert not (await ec2.get_ebs_encryption_by_default())["EbsEncryptionByDefault"]
        volume = await other.create_volume(AvailabilityZone=f"{OTHER}a", Size=1)
        made.append((other, volume["VolumeId"]))
        assert volume["Encrypted"] is True and f":{OTHER}:" in volume["KmsKeyId"]
        home = await ec2.create_volume(AvailabilityZone=f"{cloud.region}a", Size=1)
        made.append((ec2, home["VolumeId"]))
        assert home["Encrypted"] is False
        snap = await ec2.create_snapshot(VolumeId=home["VolumeId"])
        made.append((ec2, snap["SnapshotId"]))
        await _completed(ec2, snap["SnapshotId"])
        copy = await other.copy_snapshot(
            SourceSnapshotId=snap["SnapshotId"], SourceRegion=cloud.region
        )
        made.append((other, copy["SnapshotId"]))
        described = await _completed(other, copy["SnapshotId"])
        assert described["Encrypted"] is True  # the destination's default, not asked
    finally:
        await other.disable_ebs_encryption_by_default()
        for client, resource in reversed(made):
            if resource.startswith("vol-"):
                await client.delete_volume(VolumeId=resource)
            else:
                await client.delete_snapshot(SnapshotId=resource)


async def test_managers_in_two_regions_copy_a_snapshot_and_read_it_back(
    cloud: LocalCloud, manager_factory: ManagerFactory
) -> None:
    async with manager_factory() as home, manager_factory(region=OTHER) as away:
        assert away.ec2.region == OTHER
        server = await home.provision_server("regional-source")
        volume = await server.provision_volume("regional-data", size=1)
        await server.scmd(f"echo far-away > {volume.mtpt}/note && sync")
        snapshot = await volume.create_snapshot(wait=True)
        copy = await home.copy_snapshot(snapshot, away)
        try:
            snaps = (await away.ec2.describe_snapshots([copy]))[0]
            assert snaps["State"] == "completed"
            far = await away.provision_server("regional-dest")
            assert far.instance["Placement"]["AvailabilityZone"].startswith(OTHER)
            restored = await far.provision_volume("regional-copy", snapshot_id=copy)
            text = await far.scmd(f"cat {restored.mtpt}/note")
            assert text.strip() == "far-away"
            # the copy is a file of its own: the source can go, the copy stays readable
            await home.ec2.delete_snapshot(snapshot)
            assert (await far.scmd(f"cat {restored.mtpt}/note")).strip() == "far-away"
            await restored.delete()
            # a copy by region name (the manager opens a client of its own there)
            second = await volume.create_snapshot(wait=True)
            again = await home.copy_snapshot(second, OTHER, description="by name")
            await home.ec2.delete_snapshot(second)
            assert (await away.ec2.describe_snapshots([again]))[0]["Description"] == "by name"
            await away.ec2.delete_snapshot(again)
        finally:
            await away.ec2.delete_snapshot(copy)


async def _image_states(client: Any, image_id: str, within: float = 60) -> list[str]:
    seen: list[str] = []
    with anyio.fail_after(within):
        while not seen or seen[-1] != "available":
            (image,) = (await client.describe_images(ImageIds=[image_id]))["Images"]
            seen.append(str(image["State"]))
            await anyio.sleep(0.05)
    return seen


async def test_copy_image_across_regions_pending_tags_and_boots(
    cloud: LocalCloud, ec2: Any, other: Any
) -> None:
    source_tag = [{"Key": "copied-from-home", "Value": "yes"}]
    await ec2.create_tags(Resources=[cloud.image_id], Tags=source_tag)
    made: list[str] = []
    try:
        with playing(cloud, snapshot=(3.0, 3.0)):  # a copy pending for 3 s
            plain = await other.copy_image(
                SourceImageId=cloud.image_id,
                SourceRegion=cloud.region,
                Name="regional-plain",
                TagSpecifications=[
                    {"ResourceType": "image", "Tags": [{"Key": "asked", "Value": "1"}]}
                ],
            )
            made.append(plain["ImageId"])
            with pytest.raises(ClientError) as info:  # not yet: pending
                await other.run_instances(
                    ImageId=plain["ImageId"], MinCount=1, MaxCount=1, InstanceType="t3.micro"
                )
            assert info.value.response["Error"]["Code"] == "InvalidAMIID.Unavailable"
            states = await _image_states(other, plain["ImageId"])
            assert states[0] == "pending" and states[-1] == "available", states
        (image,) = (await other.describe_images(ImageIds=[plain["ImageId"]]))["Images"]
        assert {t["Key"]: t["Value"] for t in image["Tags"]} == {"asked": "1"}
        assert image["Name"] == "regional-plain"

        tagged = await other.copy_image(
            SourceImageId=cloud.image_id,
            SourceRegion=cloud.region,
            Name="regional-tagged",
            CopyImageTags=True,
        )
        made.append(tagged["ImageId"])
        await _image_states(other, tagged["ImageId"])
        (image,) = (await other.describe_images(ImageIds=[tagged["ImageId"]]))["Images"]
        assert {t["Key"]: t["Value"] for t in image["Tags"]} == {"copied-from-home": "yes"}
        with pytest.raises(ClientError):  # a copy lives in its own region only
            await ec2.describe_images(ImageIds=[tagged["ImageId"]])
    finally:
        await ec2.delete_tags(Resources=[cloud.image_id], Tags=source_tag)
        for image_id in made:
            await other.deregister_image(ImageId=image_id)


async def test_a_manager_copies_the_image_and_boots_the_copy_in_its_region(
    cloud: LocalCloud, manager_factory: ManagerFactory
) -> None:
    async with manager_factory() as home, manager_factory(region=OTHER) as away:
        copy = await home.copy_image(cloud.image_id, away, name="regional-boot")
        try:
            assert copy != cloud.image_id_in(OTHER)
            server = await away.provision_server("from-copy", image=copy)
            assert server.instance["ImageId"] == copy
            assert server.instance["Placement"]["AvailabilityZone"].startswith(OTHER)
            assert "ID=debian" in await server.scmd("cat /etc/os-release")
            await server.terminate()
        finally:
            await away.ec2.call("DeregisterImage", ImageId=copy)
