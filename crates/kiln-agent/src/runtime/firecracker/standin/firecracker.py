#!/usr/bin/python3
# Stand-in for Firecracker in the driver's tests: it reads --config-file when given, serves the
# API socket (HTTP/1.1, 204 to every request, as Firecracker answers a valid one), logs what it
# received to requests.log in its working directory (the jail root), and exits on SendCtrlAltDel
# as a guest that handles it would make Firecracker do. With IGNORE_CAD in the jail it never exits
# by itself (a guest without the i8042 driver).
import os, socket, sys

args = sys.argv[1:]
api = args[args.index("--api-sock") + 1]
log = open("requests.log", "a")
if "--config-file" in args:
    with open(args[args.index("--config-file") + 1]) as f:
        log.write("CONFIG " + f.read().replace("\n", "") + "\n")
    log.flush()
server = socket.socket(socket.AF_UNIX)
server.bind(api)
server.listen(8)
while True:
    conn, _ = server.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    if b"\r\n\r\n" not in data:
        conn.close()  # a client that connected and left (the driver's readiness probe)
        continue
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    method, path, _ = lines[0].split(" ")
    length = 0
    for line in lines[1:]:
        key, value = line.split(":", 1)
        if key.lower() == "content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(4096)
    log.write(f"{method} {path} {body.decode()}\n")
    log.flush()
    conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    conn.close()
    if b"SendCtrlAltDel" in body and not os.path.exists("IGNORE_CAD"):
        sys.exit(0)
