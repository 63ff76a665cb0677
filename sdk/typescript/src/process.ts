/**
 * A program spawned in a computer (`computers.spawn`), streamed over the WebSocket
 * `/computers/{id}/exec/stream`: its output as it is written, its exit code, and input,
 * resizes and signals going the other way. The frames are the official SDK's.
 */

import { ConnectionError } from './errors.js';

/** One piece of output, in the order the program wrote it. */
export interface OutputChunk {
  stream: 'stdout' | 'stderr';
  data: string;
}

/** The WebSocket constructor used (a browser's, Node 22+'s, or one given in the options). */
export type WebSocketConstructor = new (url: string) => WebSocket;

export interface SpawnOptions {
  /** The program's arguments (the command is then the program, not a command line). */
  args?: string[];
  /** Working directory (default `/root`). */
  cwd?: string;
  /** Variables on top of the computer's. */
  env?: Record<string, string>;
  /** With `cols`, run on a terminal of this size (output is all `stdout`). */
  rows?: number;
  cols?: number;
  /** Defaults to `globalThis.WebSocket` (Node 20 needs `--experimental-websocket`). */
  WebSocket?: WebSocketConstructor;
}

interface Frame {
  type: string;
  data?: string;
  code?: number;
  message?: string;
}

export class SpawnedProcess {
  private readonly queue: OutputChunk[] = [];
  private waiting: (() => void) | null = null;
  private ended = false;
  private readonly exited: Promise<number>;
  private settle!: (code: number) => void;
  private fail!: (err: Error) => void;
  /** Problems the server reported about frames sent to it (`error` frames), newest last. */
  readonly errors: string[] = [];

  /** @internal */
  constructor(private readonly ws: WebSocket) {
    this.exited = new Promise<number>((resolve, reject) => {
      this.settle = resolve;
      this.fail = reject;
    });
    // A caller that only reads output still sees a failure there; this keeps Node from
    // reporting the promise as unhandled when nobody waits.
    this.exited.catch(() => undefined);
    ws.addEventListener('message', (ev: MessageEvent) => {
      let frame: Frame;
      try {
        frame = JSON.parse(String(ev.data)) as Frame;
      } catch {
        return;
      }
      if (frame.type === 'stdout' || frame.type === 'stderr') {
        this.push({ stream: frame.type, data: frame.data ?? '' });
      } else if (frame.type === 'exit') {
        this.end();
        if (frame.code === -1) this.fail(new ConnectionError(`the stream ended: ${frame.message ?? 'unknown'}`));
        else this.settle(frame.code ?? 0);
      } else if (frame.type === 'error') {
        this.errors.push(frame.message ?? '');
      }
    });
    ws.addEventListener('close', () => {
      this.end();
      this.fail(new ConnectionError('the stream closed before the program exited'));
    });
  }

  private push(chunk: OutputChunk): void {
    this.queue.push(chunk);
    this.waiting?.();
  }

  private end(): void {
    this.ended = true;
    this.waiting?.();
  }

  /** The output, in order, until the program exits. */
  async *output(): AsyncGenerator<OutputChunk, void, undefined> {
    for (;;) {
      const next = this.queue.shift();
      if (next !== undefined) {
        yield next;
        continue;
      }
      if (this.ended) return;
      await new Promise<void>((resolve) => {
        this.waiting = () => {
          this.waiting = null;
          resolve();
        };
      });
    }
  }

  /** Its exit code (128 + the signal's number when a signal ended it). */
  wait(): Promise<number> {
    return this.exited;
  }

  private send(frame: Record<string, unknown>): void {
    if (this.ws.readyState !== this.ws.OPEN) throw new ConnectionError('the stream is closed');
    this.ws.send(JSON.stringify(frame));
  }

  /** Writes to its stdin. */
  write(data: string): void {
    this.send({ type: 'stdin', data });
  }

  /** Ends its stdin (on a terminal: sends end-of-file). */
  closeStdin(): void {
    this.send({ type: 'stdin_close' });
  }

  resize(rows: number, cols: number): void {
    this.send({ type: 'resize', rows, cols });
  }

  /** Sends a signal (a name such as `SIGTERM`, default `SIGKILL`) to its process group. */
  kill(signal = 'SIGKILL'): void {
    this.send({ type: 'signal', signal });
  }

  /** Closes the stream; a program still running is killed. */
  close(): void {
    this.ws.close();
  }
}

/** Opens the socket at `url`; rejects if it does not open. */
export function openSocket(Ctor: WebSocketConstructor, url: string, what: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new Ctor(url);
    const onError = () => {
      reject(
        new ConnectionError(
          `${what}: the server refused the WebSocket (a computer not running, too many sessions, or a bad request; ` +
            'the HTTP endpoints say which)',
        ),
      );
    };
    ws.addEventListener('error', onError, { once: true });
    ws.addEventListener(
      'open',
      () => {
        ws.removeEventListener('error', onError);
        resolve(ws);
      },
      { once: true },
    );
  });
}
