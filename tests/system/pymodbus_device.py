"""An independent Modbus TCP device for the system tests: pymodbus's server.

Usage: pymodbus_device.py PORT
Unit 1 holds, from address 0 (holding registers):
  0-1  f32 21.5, high word first      2-3  u32 65538, low word first
  4    i16 -5                          5-8  f64 1.5, high word first
and coil 0 = on. The test waits until the port accepts connections.
"""

import asyncio
import struct
import sys

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import StartAsyncTcpServer


def words(fmt, value):
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def main():
    port = int(sys.argv[1])
    holding = (
        words("f", 21.5)
        + list(reversed(words("I", 65538)))
        + words("h", -5)
        + words("d", 1.5)
    )
    # pymodbus data blocks are addressed from 1 for protocol address 0.
    unit = ModbusSlaveContext(
        hr=ModbusSequentialDataBlock(1, holding + [0] * 16),
        co=ModbusSequentialDataBlock(1, [True] + [False] * 15),
        di=ModbusSequentialDataBlock(1, [False] * 16),
        ir=ModbusSequentialDataBlock(1, [0] * 16),
    )
    context = ModbusServerContext(slaves={1: unit}, single=False)
    asyncio.run(StartAsyncTcpServer(context=context, address=("127.0.0.1", port)))


if __name__ == "__main__":
    main()
