"""Factory I/O: results and triggers over OPC UA, Modbus TCP and digital I/O (docs/factory-io.md).

`settings` parses the configuration, `handshake` is the PLC handshake of one camera, shared by
the protocols, `triggers` connects it to the camera worker and runs the outputs; `opcua`,
`modbus` and `gpio` are the protocols, imported only when configured (the `factory` extra).
"""
