"""Run a coroutine with Ctrl-C and SIGTERM turned into a clean stop."""

import asyncio
import signal


def run_interruptible(coro):
    """asyncio.run(coro), where the first SIGINT or SIGTERM cancels it.

    The coroutine's clean-up (ending a drain, cancelling a save, resuming
    the guest) then runs to its end: further signals are ignored.
    """
    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        interrupted = []

        def interrupt():
            if not interrupted:
                interrupted.append(True)
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        try:
            return await coro
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return asyncio.run(main())
