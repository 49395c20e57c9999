"""A real SMTP server for the delivery tests (aiosmtpd, from PyPI).

Writes every accepted message to DIR/<n>.eml and prints "ready" once it
listens. Recipients decide the reply, so that tests can provoke each class:
  *reject-perm*  -> 550 (permanent)
  *reject-temp*  -> 451 (transient)
everyone else    -> 250 (accepted)

usage: python smtp_server.py PORT DIR
"""

import asyncio
import itertools
import os
import sys

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, directory):
        self.directory = directory
        self.counter = itertools.count(1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if "reject-perm" in address:
            return "550 5.1.1 no such mailbox"
        if "reject-temp" in address:
            return "451 4.3.0 mailbox temporarily unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        n = next(self.counter)
        path = os.path.join(self.directory, f"{n:06}.eml")
        with open(path + ".tmp", "wb") as f:
            f.write(b"X-Envelope-To: " + ",".join(envelope.rcpt_tos).encode() + b"\r\n")
            f.write(envelope.original_content or envelope.content)
        os.rename(path + ".tmp", path)
        return f"250 2.0.0 queued as smtp-{n}"


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    controller = Controller(Handler(directory), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        asyncio.get_event_loop().run_forever()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
