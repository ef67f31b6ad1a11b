"""cgroup v2 device programs: eBPF built in Python, loaded through the ``bpf()`` system call.

cgroup v2 has no ``devices`` controller; its device policy is a program of type
``BPF_PROG_TYPE_CGROUP_DEVICE`` attached to a cgroup (``BPF_CGROUP_DEVICE``), which the
kernel runs at every open and ``mknod`` of a device node by a process of that cgroup (or
of one below it): it returns 1 to allow, 0 to refuse (``EPERM``). The program here is the
one runc and crun build, as raw instructions, so no compiler is needed at run time::

    r2 = ctx->access_type & 0xffff      # the device's type: block 1, char 2
    r3 = ctx->access_type >> 16         # the access: mknod 1, read 2, write 4
    r4 = ctx->major
    r5 = ctx->minor
    for each rule:                      # the first that matches allows
        if r2 != rule.type: next
        if r3 & rule.access != r3: next
        if r4 != rule.major: next
        if r5 != rule.minor: next       # (no test for a wildcard minor)
        return 1
    return 0

Programs are attached with ``BPF_F_ALLOW_MULTI``: every program attached to a cgroup and
to its ancestors must allow an access, so a program attached below (by root inside, who
keeps ``CAP_SYS_ADMIN``) can only refuse more, never allow more (``BPF_F_ALLOW_OVERRIDE``,
under which a child's program replaces its parent's, is never used). A changed policy is
a new program attached before the old one is detached: in between both run, and an access
passes only if both allow it, so the cgroup is never less strict than either policy.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# bpf() system call numbers (asm/unistd.h)
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
# commands (enum bpf_cmd)
_PROG_LOAD = 5
_PROG_ATTACH = 8
_PROG_DETACH = 9
_PROG_GET_FD_BY_ID = 13
_OBJ_GET_INFO_BY_FD = 15
_PROG_QUERY = 16
_PROG_TYPE_CGROUP_DEVICE = 15  # enum bpf_prog_type
_CGROUP_DEVICE = 6  # enum bpf_attach_type
_F_ALLOW_MULTI = 1 << 1
_ATTR_SIZE = 128  # zero-padded: the kernel checks that what it does not know is zero

# struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }
DEV_BLOCK, DEV_CHAR = 1, 2
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
_ACCESS = {"m": ACC_MKNOD, "r": ACC_READ, "w": ACC_WRITE}
_TYPE = {"b": DEV_BLOCK, "c": DEV_CHAR}

# instruction codes (linux/bpf.h, linux/bpf_common.h)
_LDX_MEM_W = 0x61  # dst = *(u32 *)(src + off)
_ALU32_AND_K = 0x54  # dst = (u32)(dst & imm)
_ALU32_RSH_K = 0x74  # dst = (u32)(dst >> imm)
_ALU32_MOV_X = 0xBC  # dst = (u32)src
_ALU64_MOV_K = 0xB7  # dst = imm
_JNE_K = 0x55  # if dst != imm: pc += off
_JNE_X = 0x5D  # if dst != src: pc += off
_EXIT = 0x95

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A ``bpf()`` call failed (``errno`` set; the verifier's log in the message)."""


@dataclass(frozen=True)
class DeviceRule:
    """Allow ``access`` ("rwm" letters) to devices of ``kind`` ("b"/"c") major:minor
    (``minor`` None: every minor)."""

    kind: str
    major: int
    minor: int | None
    access: str

    def __post_init__(self) -> None:
        if self.kind not in _TYPE or not self.access or set(self.access) - set(_ACCESS):
            raise ValueError(f"bad device rule {self}")


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``: code, dst_reg:4 | src_reg:4, s16 off, s32 imm."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def device_program(rules: Iterable[DeviceRule]) -> bytes:
    """The instructions of a program that allows exactly ``rules`` (and refuses the rest)."""
    prologue = [
        _insn(_LDX_MEM_W, 2, 1, 0),  # r2 = access_type
        _insn(_ALU32_AND_K, 2, imm=0xFFFF),  # r2: type
        _insn(_LDX_MEM_W, 3, 1, 0),  # r3 = access_type
        _insn(_ALU32_RSH_K, 3, imm=16),  # r3: access
        _insn(_LDX_MEM_W, 4, 1, 4),  # r4 = major
        _insn(_LDX_MEM_W, 5, 1, 8),  # r5 = minor
    ]
    blocks = []
    for rule in rules:
        access = 0
        for letter in rule.access:
            access |= _ACCESS[letter]
        # each test jumps to the next block when it fails: a jump's offset counts the
        # instructions after it, up to the end of this block
        tests: list[tuple[int, int, int, int]] = [(_JNE_K, 2, 0, _TYPE[rule.kind])]
        if access != ACC_MKNOD | ACC_READ | ACC_WRITE:
            tests.append((_ALU32_MOV_X, 1, 3, 0))  # r1 = access (r1, the ctx, is not needed)
            tests.append((_ALU32_AND_K, 1, 0, access))  # r1 &= allowed
            tests.append((_JNE_X, 1, 3, 0))  # asked for more than allowed
        tests.append((_JNE_K, 4, 0, rule.major))
        if rule.minor is not None:
            tests.append((_JNE_K, 5, 0, rule.minor))
        tail = [_insn(_ALU64_MOV_K, 0, imm=1), _insn(_EXIT)]
        block = []
        for i, (code, dst, src, imm) in enumerate(tests):
            jumps = code in (_JNE_K, _JNE_X)
            off = len(tests) - i - 1 + len(tail) if jumps else 0
            block.append(_insn(code, dst, src, off, imm))
        blocks.append(b"".join(block + tail))
    epilogue = [_insn(_ALU64_MOV_K, 0, imm=0), _insn(_EXIT)]
    return b"".join(prologue) + b"".join(blocks) + b"".join(epilogue)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise BpfError(errno.ENOSYS, f"bpf(): unknown system call number on {platform.machine()}")
    result = int(_libc.syscall(ctypes.c_long(number), cmd, attr, ctypes.c_uint(len(attr))))
    if result < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({cmd}): {os.strerror(err)}")
    return result


def _attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed ``union bpf_attr`` with ``(offset, struct format, value)`` fields set."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into("<" + fmt, attr, offset, value)
    return attr


def load(insns: bytes, name: str = "asyncstage_dev") -> int:
    """Load a device program; its fd (close it when done). BpfError with the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(1 << 16)
    attr = _attr(
        (0, "I", _PROG_TYPE_CGROUP_DEVICE),
        (4, "I", len(insns) // 8),  # insn_cnt
        (8, "Q", ctypes.addressof(code)),  # insns
        (16, "Q", ctypes.addressof(license)),
        (24, "I", 1),  # log_level
        (28, "I", len(log)),  # log_size
        (32, "Q", ctypes.addressof(log)),  # log_buf
        (68, "I", _CGROUP_DEVICE),  # expected_attach_type
    )
    struct.pack_into("16s", attr, 48, name.encode()[:15])  # prog_name
    try:
        return _bpf(_PROG_LOAD, attr)
    except BpfError as e:
        text = log.value.decode(errors="replace").strip()
        raise BpfError(e.errno, f"loading a device program: {e.strerror} {text}".strip()) from None


def attach(cgroup_fd: int, prog_fd: int) -> None:
    """Attach a device program to a cgroup (beside its others: ``BPF_F_ALLOW_MULTI``)."""
    _bpf(
        _PROG_ATTACH,
        _attr(
            (0, "I", cgroup_fd),
            (4, "I", prog_fd),
            (8, "I", _CGROUP_DEVICE),
            (12, "I", _F_ALLOW_MULTI),
        ),
    )


def detach(cgroup_fd: int, prog_fd: int) -> None:
    """Detach that one device program from a cgroup."""
    _bpf(_PROG_DETACH, _attr((0, "I", cgroup_fd), (4, "I", prog_fd), (8, "I", _CGROUP_DEVICE)))


def attached(cgroup_fd: int) -> list[int]:
    """The ids of the device programs attached to a cgroup itself."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr(
        (0, "I", cgroup_fd),
        (4, "I", _CGROUP_DEVICE),
        (16, "Q", ctypes.addressof(ids)),
        (24, "I", len(ids)),  # prog_cnt: in, the room; out, how many
    )
    _bpf(_PROG_QUERY, attr)
    (count,) = struct.unpack_from("<I", attr, 24)
    return list(ids[: min(count, len(ids))])


def program_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (``struct bpf_prog_info``: type, id, ...)."""
    info = ctypes.create_string_buffer(256)
    attr = _attr((0, "I", prog_fd), (4, "I", len(info)), (8, "Q", ctypes.addressof(info)))
    _bpf(_OBJ_GET_INFO_BY_FD, attr)
    return int(struct.unpack_from("<I", info, 4)[0])


def program_exists(prog_id: int) -> bool:
    """True while the kernel holds a program of that id (attached or with an open fd)."""
    try:
        fd = _bpf(_PROG_GET_FD_BY_ID, _attr((0, "I", prog_id)))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


@contextlib.contextmanager
def opened(cgroup: Path) -> Iterator[int]:
    """An fd of a cgroup directory (what attach, detach and query take)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
