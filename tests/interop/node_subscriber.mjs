// node_subscriber: a zevents subscriber in Node, written from PROTOCOL.md alone (npm `zeromq` v6 and
// `@msgpack/msgpack`), run against a live broker by tests/test_interop.py.  Set up with `npm ci` in this directory.
//
// Run:  node node_subscriber.mjs --publish EP --control EP [--count N] [--timeout S] [--rcvhwm N] PREFIX...
// Same contract as c_subscriber.c: whole-group subscriptions plus sys/Heartbeat, start point from STATUS, gaps,
// lost tails and epoch changes repaired with REPLAY (PROTOCOL.md section 6); one JSON object per delivered event on
// stdout ({"topic","node","printer","epoch","seq","ts","src","payload"}, bin as {"$bin": base64}, ext as
// {"$ext": type, "data": base64}, NaN/inf as {"$float": ...}); "READY epoch=E" then "STATS ..." on stderr.
// Exit: 0 after --count events, 1 on --timeout, 2 on usage errors, 3 when the broker does not answer STATUS.
// JavaScript has one number type, so an integral float (2.0) prints as 2: the tests use non-integral floats.
import { Dealer, Subscriber } from "zeromq";
import { Decoder, Encoder, ExtData } from "@msgpack/msgpack";

const EXIT_TIMEOUT = 1;
const EXIT_USAGE = 2;
const EXIT_BROKER = 3;
const REPLAY_LIMIT = 20000;
const MAX_REPLAY_ROUNDS = 10000;

// uint64 (how the broker always writes epoch, seq and ts) and int64 decode as BigInt: exact, never rounded.
const decoder = new Decoder({ useBigInt64: true });
const encoder = new Encoder({ useBigInt64: true });

const stats = {
  delivered: 0, replayed: 0, replays: 0, gaps: 0, missing: 0n, lost: 0n, dupes: 0, stale: 0, epochs: 0,
  bad_frames: 0, bad_topic: 0, bad_header: 0, bad_payload: 0, bad_replies: 0, late_replies: 0,
};

function usage(message) {
  if (message) process.stderr.write(`node_subscriber: ${message}\n`);
  process.stderr.write("usage: node node_subscriber.mjs --publish EP --control EP [--count N] [--timeout S] "
    + "[--rcvhwm N] [--control-timeout S] [--heartbeat S] PREFIX...\n");
  process.exit(EXIT_USAGE);
}

function parseArgs(argv) {
  const opt = { count: 0, timeout: 30, controlTimeout: 5, heartbeat: 1, rcvhwm: -1, prefixes: [], wantAll: false };
  const numbers = { "--count": "count", "--timeout": "timeout", "--control-timeout": "controlTimeout",
                    "--heartbeat": "heartbeat", "--rcvhwm": "rcvhwm" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith("--")) {
      if (i + 1 >= argv.length) usage(`a value must follow ${a}`);
      const v = argv[++i];
      if (a === "--publish") opt.publish = v;
      else if (a === "--control") opt.control = v;
      else if (a in numbers) {
        const n = Number(v);
        if (v === "" || !Number.isFinite(n) || n < 0) usage(`bad value for ${a}`);
        opt[numbers[a]] = n;
      } else usage(`unknown option ${a}`);
      continue;
    }
    // "print" means the group print/, never a longer group name that starts the same way.
    if (a === "") opt.wantAll = true;
    else if (a.startsWith("/")) usage(`bad prefix ${a}`);
    opt.prefixes.push(a === "" || a.includes("/") ? a : `${a}/`);
  }
  if (!opt.publish || !opt.control) usage("--publish and --control are required");
  if (opt.prefixes.length === 0) usage('give at least one PREFIX ("" for everything)');
  return opt;
}

const opt = parseArgs(process.argv.slice(2));
const wantedGroups = new Set(opt.prefixes.filter((p) => p !== "").map((p) => p.slice(0, p.indexOf("/"))));
const groupWanted = (g) => opt.wantAll || wantedGroups.has(g);
const topicWanted = (t) => opt.prefixes.some((p) => t.startsWith(p));

// ------------------------------------------------------------------ JSON output

function toJson(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "boolean") return v ? "true" : "false";
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number") {
    if (Number.isNaN(v)) return '{"$float":"NaN"}';
    if (!Number.isFinite(v)) return v > 0 ? '{"$float":"Infinity"}' : '{"$float":"-Infinity"}';
    return JSON.stringify(v);
  }
  if (typeof v === "string") return JSON.stringify(v);
  if (v instanceof Uint8Array) {
    return `{"$bin":"${Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString("base64")}"}`;
  }
  if (v instanceof ExtData) {
    const data = v.data instanceof Uint8Array ? Buffer.from(v.data).toString("base64") : "";
    return `{"$ext":${v.type},"data":"${data}"}`;
  }
  if (v instanceof Date) return `{"$timestamp":${JSON.stringify(Number.isNaN(v.getTime()) ? null : v.toISOString())}}`;
  if (Array.isArray(v)) return `[${v.map(toJson).join(",")}]`;
  if (v instanceof Map) return `{${[...v].map(([k, x]) => `${JSON.stringify(String(k))}:${toJson(x)}`).join(",")}}`;
  return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}:${toJson(x)}`).join(",")}}`;
}

// ------------------------------------------------------------------ sockets and state

const sub = new Subscriber({ linger: 0 });
if (opt.rcvhwm >= 0) sub.receiveHighWaterMark = opt.rcvhwm;
const dealer = new Dealer({ linger: 0 });
let epoch = null;             // BigInt: the broker run our counters belong to
const retiredEpochs = [];     // earlier runs: their stragglers are stale, not a new restart
const last = new Map();       // group -> last seq seen (BigInt)
let nextId = 1;
let finished = false;

function finish(code) {
  if (finished) return;
  finished = true;
  const line = Object.entries(stats).map(([k, v]) => `${k}=${v}`).join(" ");
  process.stderr.write(`STATS ${line}\n`);
  process.exitCode = code;
  sub.close();
  dealer.close();
}

class Finished extends Error {}

function decodeFrame(frame) {
  try {
    return { ok: true, value: decoder.decode(frame) };
  } catch (error) {
    return { ok: false, error };
  }
}

const isMap = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Uint8Array)
  && !(v instanceof ExtData) && !(v instanceof Date);
const isUint = (v) => typeof v === "bigint" ? v >= 0n : Number.isInteger(v) && v >= 0;
const big = (v) => BigInt(v);

function changeEpoch(newEpoch) {
  if (epoch !== null) retiredEpochs.push(epoch);
  process.stderr.write(`WARN epoch changed ${epoch} -> ${newEpoch}: resynchronising\n`);
  epoch = newEpoch;
  stats.epochs++;
  for (const g of last.keys()) last.set(g, 0n);
}

function deliver(topic, h, payload) {
  process.stdout.write(`{"topic":${JSON.stringify(topic)},"node":${toJson(h.node)},"printer":${toJson(h.printer)},`
    + `"epoch":${h.epoch},"seq":${h.seq},"ts":${h.ts},"src":${toJson(h.src)},"payload":${toJson(payload)}}\n`);
  stats.delivered++;
  if (opt.count > 0 && stats.delivered >= opt.count) {
    finish(0);
    throw new Finished();
  }
}

// ------------------------------------------------------------------ control channel

async function request(command, args) {
  const id = nextId++;
  await dealer.send([command, encoder.encode({ id, ...args })]);
  const deadline = Date.now() + opt.controlTimeout * 1000;
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`${command}: no reply within ${opt.controlTimeout} s`);
    dealer.receiveTimeout = Math.max(1, Math.ceil(left));
    let frames;
    try {
      frames = await dealer.receive();
    } catch (error) {
      if (error.code === "EAGAIN") continue;
      throw error;
    }
    const map = frames.length >= 2 ? decodeFrame(frames[1]) : { ok: false };
    if (!map.ok || !isMap(map.value)) {
      stats.bad_replies++;
      process.stderr.write(`WARN ${command}: malformed reply (${frames.length} frames)\n`);
      continue;
    }
    if (map.value.id === undefined || big(map.value.id) !== big(id)) {
      stats.late_replies++;
      continue;
    }
    if (frames[0].toString() !== "OK") throw new Error(`${command}: broker answered ${frames[0]}: ${map.value.error}`);
    return { map: map.value, data: frames.slice(2) };
  }
}

async function replay(group, upto) {
  for (let round = 0; round < MAX_REPLAY_ROUNDS && last.get(group) < upto; round++) {
    let reply;
    try {
      reply = await request("REPLAY", { group, since: last.get(group), limit: REPLAY_LIMIT, epoch });
    } catch (error) {
      process.stderr.write(`WARN ${error.message}\n`);
      return; // the next gap or heartbeat retries
    }
    stats.replays++;
    const { map, data } = reply;
    if (!isUint(map.epoch) || !isUint(map.count) || data.length !== 3 * Number(map.count)) {
      stats.bad_replies++;
      process.stderr.write(`WARN REPLAY ${group}: reply map and frame count disagree (${data.length + 2} frames)\n`);
      return;
    }
    if (big(map.epoch) !== epoch) {
      changeEpoch(big(map.epoch)); // our since belonged to a previous run: start again from 0
      continue;
    }
    if (isUint(map.lost) && big(map.lost) > 0n) {
      stats.lost += big(map.lost);
      process.stderr.write(`WARN REPLAY ${group} since ${last.get(group)}: ${map.lost} events already left the ring\n`);
    }
    const before = last.get(group);
    for (let i = 0; i < data.length; i += 3) await handleEvent(data[i], data[i + 1], data[i + 2], true);
    if (map.more !== true || last.get(group) === before) return;
  }
}

// ------------------------------------------------------------------ events

function decodeHeader(frame) {
  const d = decodeFrame(frame);
  if (!d.ok || !isMap(d.value)) return null;
  const h = d.value;
  for (const k of ["v", "epoch", "seq", "ts"]) if (!isUint(h[k])) return null;
  if (typeof h.node !== "string" || typeof h.src !== "string") return null;
  if (h.printer !== undefined && h.printer !== null && typeof h.printer !== "string") return null;
  return { v: big(h.v), node: h.node, printer: h.printer ?? null, epoch: big(h.epoch), seq: big(h.seq),
           ts: big(h.ts), src: h.src };
}

async function handleEvent(topicFrame, headerFrame, payloadFrame, fromReplay) {
  const topic = topicFrame.toString("utf8");
  const slash = topic.indexOf("/");
  if (slash <= 0 || slash === topic.length - 1) {
    stats.bad_topic++;
    process.stderr.write(`WARN bad topic ${JSON.stringify(topic)}: no <group>/<Name>\n`);
    return;
  }
  const h = decodeHeader(headerFrame);
  if (h === null || h.v !== 1n) {
    stats.bad_header++;
    process.stderr.write(`WARN bad header on ${topic}\n`);
    return;
  }
  const payload = decodeFrame(payloadFrame);
  const payloadOk = payload.ok && isMap(payload.value);
  if (h.epoch !== epoch) {
    if (fromReplay || retiredEpochs.includes(h.epoch)) {
      stats.stale++;
      return;
    }
    changeEpoch(h.epoch);
  }
  const group = topic.slice(0, slash);
  if (!last.has(group)) last.set(group, 0n);
  if (groupWanted(group)) {
    if (h.seq <= last.get(group)) {
      stats.dupes++;
    } else {
      if (h.seq > last.get(group) + 1n && !fromReplay) {
        stats.gaps++;
        await replay(group, h.seq - 1n);
        if (h.epoch !== epoch) {
          stats.stale++; // the replay met a newer broker run: this event's seq means nothing now
          return;
        }
      }
      if (h.seq > last.get(group)) {
        if (h.seq > last.get(group) + 1n) stats.missing += h.seq - last.get(group) - 1n;
        last.set(group, h.seq);
        if (!payloadOk) {
          stats.bad_payload++; // the seq is consumed all the same: the event exists, we just cannot show it
          process.stderr.write(`WARN bad payload on ${topic} seq ${h.seq}: not a msgpack map\n`);
        } else if (topicWanted(topic)) {
          if (fromReplay) stats.replayed++;
          deliver(topic, h, payload.value);
        }
      } else {
        stats.dupes++;
      }
    }
  }
  // A heartbeat's streams reveal a lost tail: groups whose last seq is ahead of ours.
  if (!fromReplay && payloadOk && topic === "sys/Heartbeat" && isMap(payload.value.streams) && h.epoch === epoch) {
    for (const [g, v] of Object.entries(payload.value.streams)) {
      if (h.epoch !== epoch) break; // a replay met a newer broker run: these streams are stale
      if (!isUint(v) || !groupWanted(g)) continue;
      if (!last.has(g)) last.set(g, 0n);
      if (big(v) > last.get(g)) {
        stats.gaps++;
        await replay(g, big(v));
      }
    }
  }
}

// ------------------------------------------------------------------ main

async function main() {
  sub.connect(opt.publish);
  dealer.connect(opt.control);
  // Whole groups only (seq is per group), then sys/Heartbeat for tail loss and liveness.
  if (opt.wantAll) sub.subscribe();
  else {
    for (const g of wantedGroups) sub.subscribe(`${g}/`);
    if (!wantedGroups.has("sys")) sub.subscribe("sys/Heartbeat");
  }
  try {
    const { map } = await request("STATUS", {});
    if (!isUint(map.epoch) || (map.streams !== undefined && !isMap(map.streams))) {
      throw new Error("STATUS: reply lacks epoch or streams");
    }
    epoch = big(map.epoch);
    for (const [g, v] of Object.entries(map.streams ?? {})) if (isUint(v)) last.set(g, big(v));
  } catch (error) {
    process.stderr.write(`ERROR broker did not answer STATUS on ${opt.control}: ${error.message}\n`);
    finish(EXIT_BROKER);
    return;
  }
  process.stderr.write(`READY epoch=${epoch}\n`);

  const start = Date.now();
  let lastHeartbeat = start;
  let silenceWarned = 0;
  for (;;) {
    const now = Date.now();
    if (now - start >= opt.timeout * 1000) {
      process.stderr.write(`TIMEOUT after ${opt.timeout} s with ${stats.delivered} events\n`);
      finish(EXIT_TIMEOUT);
      return;
    }
    if (now - lastHeartbeat > 3000 * opt.heartbeat && now - silenceWarned > 3000 * opt.heartbeat) {
      process.stderr.write(`WARN no heartbeat for ${(now - lastHeartbeat) / 1000} s: broker gone or cut off\n`);
      silenceWarned = now;
    }
    sub.receiveTimeout = Math.max(1, Math.ceil(Math.min(opt.timeout * 1000 - (now - start), opt.heartbeat * 1000)));
    let frames;
    try {
      frames = await sub.receive();
    } catch (error) {
      if (error.code === "EAGAIN") continue;
      throw error;
    }
    if (frames.length !== 3) {
      stats.bad_frames++;
      process.stderr.write(`WARN message of ${frames.length} frames (expected 3): dropped\n`);
      continue;
    }
    if (frames[0].toString() === "sys/Heartbeat") lastHeartbeat = Date.now();
    try {
      await handleEvent(frames[0], frames[1], frames[2], false);
    } catch (error) {
      if (error instanceof Finished) return;
      throw error;
    }
  }
}

main().catch((error) => {
  process.stderr.write(`ERROR ${error.stack ?? error}\n`);
  finish(EXIT_BROKER);
});
