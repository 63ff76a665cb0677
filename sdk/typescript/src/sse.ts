/**
 * A parser for `text/event-stream` (the server-sent events wire format): lines end in CRLF,
 * LF or CR; `field: value` lines build an event and a blank line dispatches it; lines starting
 * with `:` are comments (keep-alives); `data` lines accumulate, joined by `\n`.
 */

/** One dispatched event, before its data is interpreted. */
export interface RawSseEvent {
  /** The `event:` field; `message` when the event had none. */
  event: string;
  data: string;
  /** The `id:` field of this event, or null if it set none. */
  id: string | null;
  /** A `retry:` field, in milliseconds, if the event carried one. */
  retry: number | null;
}

export class SseParser {
  private buffer = '';
  private sawFirstChunk = false;
  private pendingCR = false;
  private eventType = '';
  private dataLines: string[] = [];
  private eventId: string | null = null;
  private retry: number | null = null;
  private hasFields = false;

  /** Feeds decoded text; returns the events completed by it. */
  push(text: string): RawSseEvent[] {
    if (!this.sawFirstChunk && text.length > 0) {
      this.sawFirstChunk = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    // A CR that ended the previous chunk already ended its line; a LF right after it belongs to it.
    if (this.pendingCR) {
      this.pendingCR = false;
      if (text.startsWith('\n')) text = text.slice(1);
    }
    this.buffer += text;
    const out: RawSseEvent[] = [];
    let start = 0;
    for (let i = 0; i < this.buffer.length; i++) {
      const c = this.buffer.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.buffer.slice(start, i);
      if (c === 13) {
        if (i + 1 < this.buffer.length) {
          if (this.buffer.charCodeAt(i + 1) === 10) i++;
        } else {
          this.pendingCR = true;
        }
      }
      start = i + 1;
      const ev = this.line(line);
      if (ev) out.push(ev);
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }

  /** The stream ended: an event not closed by a blank line is dropped, as the standard says. */
  end(): RawSseEvent[] {
    this.buffer = '';
    this.reset();
    return [];
  }

  private reset(): void {
    this.eventType = '';
    this.dataLines = [];
    this.eventId = null;
    this.retry = null;
    this.hasFields = false;
  }

  private line(line: string): RawSseEvent | null {
    if (line === '') {
      if (!this.hasFields || this.dataLines.length === 0) {
        this.reset();
        return null;
      }
      const ev: RawSseEvent = {
        event: this.eventType || 'message',
        data: this.dataLines.join('\n'),
        id: this.eventId,
        retry: this.retry,
      };
      this.reset();
      return ev;
    }
    if (line.startsWith(':')) return null; // a comment: keep-alive
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    switch (field) {
      case 'event':
        this.eventType = value;
        break;
      case 'data':
        this.dataLines.push(value);
        break;
      case 'id':
        if (!value.includes('\0')) this.eventId = value;
        break;
      case 'retry':
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
        return null; // unknown fields are ignored
    }
    this.hasFields = true;
    return null;
  }
}

/**
 * Reads an event stream body to its end, yielding events as they complete. `onChunk` is called
 * for every chunk read (keep-alives included), so a caller can watch for a silent connection.
 */
export async function* readEventStream(
  body: ReadableStream<Uint8Array>,
  onChunk?: () => void,
): AsyncGenerator<RawSseEvent, void, undefined> {
  const reader = body.getReader();
  const decoder = new TextDecoder('utf-8');
  const parser = new SseParser();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      onChunk?.();
      for (const ev of parser.push(decoder.decode(value, { stream: true }))) yield ev;
    }
    for (const ev of parser.push(decoder.decode())) yield ev;
    parser.end();
  } finally {
    // Stops the download when the consumer leaves early (a terminal event, a break, an error).
    reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}
