// The charging post page's backend: serves index.html and /api/ws-token, which requests a connection URL
// from the gateway with the API key, so the key never reaches the browser. Needs Node.js 18 or later.
//
//   WSGW_SERVER=http://127.0.0.1:8086 WSGW_API_KEY=... node examples/charging-post/server.mjs
//
// Environment: WSGW_SERVER (gateway base URL, default http://127.0.0.1:8086), WSGW_API_KEY (required),
// LISTEN_PORT (default 8090).

import { createServer } from "node:http";
import { readFile } from "node:fs/promises";

const gateway = process.env.WSGW_SERVER ?? "http://127.0.0.1:8086";
const apiKey = process.env.WSGW_API_KEY;
const port = Number(process.env.LISTEN_PORT ?? 8090);
if (!apiKey) {
  console.error("WSGW_API_KEY is missing; set it to one of the gateway's auth.api_keys");
  process.exit(2);
}
const page = new URL("./index.html", import.meta.url);
// Same rule as the gateway's uniqueId: 1 to 128 ASCII letters, digits or - _ . : @
const POST_ID = /^[A-Za-z0-9_.:@-]{1,128}$/;

const server = createServer(async (request, response) => {
  const url = new URL(request.url, `http://${request.headers.host}`);
  if (url.pathname === "/" && !url.searchParams.has("gateway")) {
    url.searchParams.set("gateway", gateway);
    response.writeHead(302, { Location: `${url.pathname}${url.search}` }).end();
  } else if (url.pathname === "/") {
    response.writeHead(200, { "Content-Type": "text/html; charset=utf-8" }).end(await readFile(page));
  } else if (url.pathname === "/api/ws-token") {
    const postId = url.searchParams.get("post") ?? "";
    if (!POST_ID.test(postId)) {
      reply(response, 400, `invalid post ${JSON.stringify(postId)}: use 1 to 128 letters, digits or - _ . : @`);
      return;
    }
    // A real backend checks here that the caller may act as this post.
    const tokenUrl = new URL("/websocket/token", gateway);
    tokenUrl.searchParams.set("uniqueId", postId);
    tokenUrl.searchParams.set("clientType", "charger");
    try {
      const answer = await fetch(tokenUrl, { headers: { Authorization: `Bearer ${apiKey}` } });
      response.writeHead(answer.status, { "Content-Type": "application/json", "Cache-Control": "no-store" });
      response.end(await answer.text());
    } catch (error) {
      reply(response, 503, `cannot reach the gateway at ${gateway}: ${error.message}`);
    }
  } else {
    reply(response, 404, "not found; this backend serves / and /api/ws-token");
  }
});

function reply(response, status, description) {
  response.writeHead(status, { "Content-Type": "application/json" });
  response.end(JSON.stringify({ result: status, description, data: null }));
}

server.listen(port, "127.0.0.1", () => {
  console.log(`charging post page at http://127.0.0.1:${port}/?post=post-0042 (gateway ${gateway})`);
});
