// Talking to this node's HTTP API: the API key (kept in sessionStorage, sent as Bearer), JSON calls and
// server-sent events read from a fetch() body (EventSource cannot send the Authorization header).

const KEY_ITEM = "lanmesh.apiKey";

/** The node answered 401: the page must ask for the key (again). */
export class NeedsKey extends Error {}

/** Any other error answer, with OpenAI's `{error: {message}}` read out. */
export class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const apiKey = () => sessionStorage.getItem(KEY_ITEM) || "";
export const rememberKey = (key) => sessionStorage.setItem(KEY_ITEM, key);
export const forgetKey = () => sessionStorage.removeItem(KEY_ITEM);

/** fetch() with the key; resolves to the Response when it is 2xx, else throws NeedsKey or ApiFailure. */
export async function call(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (response.status === 401) throw new NeedsKey(await errorMessage(response));
  if (!response.ok) throw new ApiFailure(response.status, await errorMessage(response));
  return response;
}

export async function getJson(path, options) {
  return (await call(path, options)).json();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

/** The JSON payload of each `data:` event of a server-sent event stream, until `[DONE]` or the end. */
export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}
