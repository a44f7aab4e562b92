// BorderLink dispatcher console: plain ES module, no build step.
// One RTCPeerConnection per monitored talkgroup (the gateway makes each one a port);
// PTT and who-is-talking travel on one WebSocket.

const $ = (sel, root = document) => root.querySelector(sel);
const consoleId = Array.from(crypto.getRandomValues(new Uint8Array(8)), b => b.toString(16).padStart(2, "0")).join("");

const ui = {
  site: $("#site"), who: $("#who"), link: $("#link"), banner: $("#banner"), logout: $("#logout"),
  login: $("#login"), loginError: $("#login-error"), main: $("#console"), tiles: $("#tiles"),
  alarm: $("#alarm"), alarmText: $("#alarm-text"), alarmAck: $("#alarm-ack"),
};
const HEARTBEAT_MS = 1000;      // the page pings the gateway this often…
const SILENCE_MS = 2000;        // …and calls it unreachable after this long without a word
const EMERGENCY_HOLD_MS = 1000; // EMERG must be held this long: no emergency by a slip

const tiles = new Map();        // talkgroup → {el, pc, sender, source, analyser, audio, monitor, info}
let ws = null, wsBackoff = 500, me = null, mic = null, micError = "", audioCtx = null;
let selected = null, pttHeld = null, running = false, lastHeard = 0, lastPing = 0, alarms = [], alarmTone = null;
let arming = null;  // {tg, timer}: EMERG held, not yet long enough

// Diagnostics for tests and field troubleshooting (no secrets here).
const diag = { log: [], talkerSeen: {}, consoleId };
window.borderlink = diag;

// The banner's line is always there (empty when quiet): showing a message never moves a
// PTT button from under a pressed pointer.
function banner(text) { ui.banner.textContent = text || ""; ui.banner.classList.toggle("on", !!text); }
function setLink(text, cls) {
  if (ui.link.textContent !== text) diag.log.push({ t: Date.now(), link: text });
  ui.link.textContent = text; ui.link.className = "link " + (cls || "");
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const r = await fetch(path, { credentials: "same-origin", ...opts });
  let data = null;
  try { data = await r.json(); } catch { data = { error: await r.text().catch(() => "") }; }
  return { status: r.status, ok: r.ok, data };
}

// --- login -----------------------------------------------------------------------

ui.login.addEventListener("submit", async (e) => {
  e.preventDefault();
  ui.loginError.textContent = "";
  let r;
  try {
    r = await api("/api/console/login", { operator: $("#operator").value, password: $("#password").value });
  } catch {
    ui.loginError.textContent = "Gateway unreachable. Check the address and your network.";
    return;
  }
  if (!r.ok) {
    ui.loginError.textContent = (r.data && r.data.error) || `login failed (${r.status})`;
    return;
  }
  $("#password").value = "";
  await start();
});

ui.logout.addEventListener("click", async () => {
  pttRelease();
  await api("/api/console/logout", {}).catch(() => {});
  location.reload();
});

function showLogin(message) {
  // Nothing of the previous operator's page stays above the form: their name, their
  // tiles and calls, an old "unreachable" banner or alarm.
  running = false;
  pttRelease(false);
  for (const [name, t] of tiles) dropTile(name, t);
  me = null; alarms = []; showAlarms();
  ui.who.textContent = ""; ui.site.textContent = "";
  banner("");
  ui.main.hidden = true; ui.logout.hidden = true; ui.login.hidden = false;
  ui.loginError.textContent = message || "";
  setLink("logged out", "");
  $("#operator").focus();
}

// --- start-up ----------------------------------------------------------------------

async function boot() {
  let r;
  try { r = await api("/api/console/me"); } catch {
    setLink("unreachable", "down");
    banner("Gateway unreachable — retrying…");
    setTimeout(boot, 2000);
    return;
  }
  if (r.status === 401) { showLogin(); return; }
  await start(r.data);
}

async function start(profile) {
  if (!profile) {
    const r = await api("/api/console/me");
    if (!r.ok) { showLogin("session not accepted"); return; }
    profile = r.data;
  }
  me = profile;
  running = true;
  ui.site.textContent = "— " + me.site;
  ui.who.textContent = `${me.display}${me.agency ? " (" + me.agency + ")" : ""}`;
  ui.login.hidden = true; ui.main.hidden = false; ui.logout.hidden = false;
  audioCtx = audioCtx || new AudioContext();
  if (audioCtx.state === "suspended") audioCtx.resume().catch(() => {});
  await openMic();
  connect();
}

async function openMic() {
  if (mic) return;
  if (!navigator.mediaDevices || !window.isSecureContext) {
    micError = "No microphone: the console needs HTTPS (or localhost) for audio input. Monitor only.";
    banner(micError);
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    mic = stream.getAudioTracks()[0];
    micError = "";
  } catch (err) {
    micError = err && err.name === "NotAllowedError"
      ? "Microphone access was denied: you can monitor, but PTT needs the microphone. Allow it in the browser's site settings and reload."
      : `No microphone available (${err && err.name}): monitor only.`;
    banner(micError);
  }
}

// --- event socket --------------------------------------------------------------------

function connect() {
  if (!running) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  if (!ui.link.classList.contains("down")) setLink("connecting…", "");
  const sock = new WebSocket(`${proto}//${location.host}/api/console/events`);
  ws = sock;
  let opened = false;
  sock.onopen = () => {
    opened = true; wsBackoff = 500; lastHeard = Date.now();
    setLink("connected", "up");
    if (!micError) banner("");
    sock.send(JSON.stringify({ type: "hello", console: consoleId }));
  };
  sock.onmessage = (e) => { lastHeard = Date.now(); onMessage(JSON.parse(e.data)); };
  sock.onclose = () => lost(sock, opened);
}

// Heartbeat: a gateway that stops answering (frozen, cable pulled, half-open TCP) is
// shown as unreachable within SILENCE_MS + one check, not when TCP finally gives up.
setInterval(() => {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  if (Date.now() - lastHeard > SILENCE_MS) {
    const sock = ws;
    sock.onclose = null;
    try { sock.close(); } catch { /* already closing */ }
    lost(sock, true, "unreachable");
    return;
  }
  if (Date.now() - lastPing >= HEARTBEAT_MS) { lastPing = Date.now(); send({ type: "ping" }); }
}, HEARTBEAT_MS / 4);

async function lost(sock, opened, why = "reconnecting…") {
    if (ws !== sock) return;
    ws = null;
    pttRelease(false);
    if (!running) return;
    if (!opened) {  // refused before the upgrade: logged out, or gateway down?
      try {
        const r = await api("/api/console/me");
        if (r.status === 401) { showLogin("Your session ended; log in again."); return; }
      } catch { /* unreachable: retry below */ }
    }
    setLink(why, "down");
    banner("Gateway unreachable — reconnecting…");
    setTimeout(connect, why === "unreachable" ? 0 : wsBackoff);
    wsBackoff = Math.min(wsBackoff * 2, 5000);
}

function send(msg) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg)); }

function onMessage(msg) {
  if (msg.type === "pong") return;
  if (msg.type === "state") { render(msg); return; }
  if (msg.type === "hello") {
    // After a reconnect the gateway may have lost our calls (restart): join again.
    for (const [tg, t] of tiles) if (t.monitor && !msg.joined.includes(tg)) rejoin(tg);
    return;
  }
  if (msg.type === "refused") {
    const t = tiles.get(msg.talkgroup);
    if (t) $(".state", t.el).textContent = `PTT refused: ${msg.reason}`;
    diag.log.push({ t: Date.now(), refused: msg.talkgroup, reason: msg.reason });
    if (pttHeld && pttHeld.tgs.includes(msg.talkgroup)) {
      if (pttHeld.tgs.length === 1) pttRelease(false);
      else { pttHeld.refused[msg.talkgroup] = msg.reason; showAllCall(); }
    }
    return;
  }
  if (msg.type === "left") {
    const t = tiles.get(msg.talkgroup);
    if (t) { hangUp(t); $(".state", t.el).textContent = msg.reason; if (t.monitor && msg.reason === "connection lost") rejoin(msg.talkgroup); }
    return;
  }
  if (msg.type === "logged_out") {  // the operator was removed or their password changed
    diag.log.push({ t: Date.now(), loggedOut: msg.reason });
    running = false;
    pttRelease(false);
    for (const [name, t] of tiles) dropTile(name, t);
    showLogin(`Logged out by the gateway: ${msg.reason}.`);
    return;
  }
  if (msg.type === "link_refused") {
    banner(`Link: ${msg.reason}`);
    diag.log.push({ t: Date.now(), linkRefused: msg.reason });
    return;
  }
  if (msg.type === "patch_refused") {
    $("#allcall-status").textContent = `Patch refused: ${msg.reason}`;
    diag.log.push({ t: Date.now(), patchRefused: msg.reason });
    return;
  }
  if (msg.type === "error") banner(msg.message);
}

function dropTile(name, t) {
  hangUp(t);
  t.el.remove();
  tiles.delete(name);
  if (selected === name) selected = null;
}

// --- tiles -----------------------------------------------------------------------------

function tileFor(info) {
  let t = tiles.get(info.name);
  if (t) return t;
  const el = $("#tile").content.firstElementChild.cloneNode(true);
  el.dataset.talkgroup = info.name;
  $(".name", el).textContent = info.name;
  // A screen reader names each control with its talkgroup ("Monitor marine", …).
  el.setAttribute("aria-label", `Talkgroup ${info.name}`);
  $(".monitor-toggle", el).setAttribute("aria-label", `Monitor ${info.name}`);
  $(".pick-toggle", el).setAttribute("aria-label", `Select ${info.name}`);
  $(".volume-slider", el).setAttribute("aria-label", `Volume of ${info.name}`);
  $(".emergency", el).setAttribute("aria-label", `Emergency call on ${info.name}: hold for one second`);
  $(".unpatch", el).setAttribute("aria-label", `Unpatch ${info.name}`);
  $(".level", el).setAttribute("aria-label", `Level on ${info.name}`);
  $(".side", el).setAttribute("aria-label", `Ear for ${info.name}`);
  for (const r of el.querySelectorAll(".side input")) r.name = `side-${info.name}`;
  el.title = info.description || info.name;
  t = { el, pc: null, sender: null, source: null, analyser: null, audio: null, monitor: true, info };
  tiles.set(info.name, t);
  ui.tiles.appendChild(el);
  const ptt = $(".ptt", el), emer = $(".emergency", el);
  // The pointer is captured while held: PTT ends when the button is let go (or the
  // browser takes the pointer away), never because something moved under it.
  const hold = (btn, press) => {
    btn.addEventListener("pointerdown", (e) => {
      e.preventDefault(); select(info.name);
      try { btn.setPointerCapture(e.pointerId); } catch { /* synthetic pointer */ }
      press();
    });
    const up = (e) => { e.preventDefault(); disarm(); pttRelease(); };
    btn.addEventListener("pointerup", up);
    btn.addEventListener("pointercancel", up);
    btn.addEventListener("lostpointercapture", up);
    btn.addEventListener("keydown", (e) => { if (e.key === "Enter") e.preventDefault(); });
    // A finger held on a tablet is a long press: no context menu over a held PTT.
    btn.addEventListener("contextmenu", (e) => e.preventDefault());
  };
  hold(ptt, () => pttPress(info.name, false));
  hold(emer, () => arm(info.name));
  el.addEventListener("focus", () => select(info.name));
  el.addEventListener("click", () => select(info.name));
  $(".monitor-toggle", el).checked = true;
  $(".pick-toggle", el).addEventListener("change", showToolbar);
  $(".unpatch", el).addEventListener("click", (e) => {
    e.stopPropagation();
    if (e.target.dataset.patch) send({ type: "unpatch", patch: e.target.dataset.patch });
  });
  $(".monitor-toggle", el).addEventListener("change", (e) => setMonitor(info.name, e.target.checked));
  const saved = tileSettings()[info.name] || {};
  if (typeof saved.volume === "number") $(".volume-slider", el).value = String(saved.volume);
  if (["left", "right", "both"].includes(saved.side)) $(`.side input[value="${saved.side}"]`, el).checked = true;
  $(".volume-slider", el).addEventListener("input", () => { applyVolume(t); saveTile(info.name); });
  for (const r of el.querySelectorAll(".side input")) r.addEventListener("change", () => {
    saveTile(info.name);
    send({ type: "side", talkgroup: info.name, side: sideOf(t) });
  });
  if (!selected) select(info.name);
  join(info.name);
  return t;
}

function render(state) {
  diag.lastState = state;
  alarms = state.alarms || [];
  showAlarms();
  renderLinks(state.links || []);
  const now = Date.now();
  // A talkgroup no longer permitted (or removed by a reload) loses its tile.
  const shown = new Set(state.talkgroups.map(x => x.name));
  for (const [name, t] of tiles) if (!shown.has(name)) dropTile(name, t);
  for (const info of state.talkgroups) {
    const t = tileFor(info);
    t.info = info;
    const el = t.el;
    $(".floor", el).textContent = info.floor === "single" ? "single floor" : "mix";
    const patch = $(".patch", el), unpatch = $(".unpatch", el);
    patch.textContent = info.patched_with.length ? `patched: ${info.patched_with.join(", ")}` : "";
    unpatch.hidden = !(info.may_patch && info.patches.length);
    unpatch.dataset.patch = info.patches[0] || "";
    renderHistory(t, info.history || [], info.recall || []);
    const talkers = info.talkers;
    const text = talkers.length
      ? talkers.map(x => `${x.emergency ? "⚠ " : ""}${x.who}${x.agency ? " (" + x.agency + ")" : ""}`).join(", ")
      : "—";
    const talker = $(".talker", el);
    if (talker.textContent !== text) {
      talker.textContent = text; talker.title = text;
      diag.log.push({ t: now, talkgroup: info.name, talkers: talkers.map(x => x.port) });
    }
    for (const x of talkers) {
      const key = `${info.name}|${x.port}`;
      if (!(key in diag.talkerSeen)) diag.talkerSeen[key] = now;
    }
    for (const key of Object.keys(diag.talkerSeen)) {
      const [tg, port] = key.split("|");
      if (tg === info.name && !talkers.some(x => x.port === port)) delete diag.talkerSeen[key];
    }
    el.classList.toggle("active", talkers.length > 0);
    if (pttHeld && pttHeld.tgs.includes(info.name)) showAllCall();
    el.classList.toggle("emergency-on", talkers.some(x => x.emergency));
    $(".level", el).value = Math.max(-60, info.level_dbfs);
    const ptt = $(".ptt", el);
    ptt.setAttribute("aria-disabled", String(!info.may_talk || !mic));
    ptt.classList.toggle("monitor-only", !info.may_talk);
    ptt.textContent = info.may_talk ? "PTT" : "MONITOR ONLY";
    ptt.title = !info.may_talk ? "monitor only" : (!mic ? "no microphone" : "hold to talk");
    ptt.setAttribute("aria-label", `Push to talk on ${info.name}` + (info.may_talk ? "" : " (monitor only)"));
    const emergencyHeard = talkers.some(x => x.emergency);
    ptt.classList.toggle("busy", info.me === "busy" && !emergencyHeard);
    $(".emergency", el).hidden = !info.may_emergency;
    const words = { off: t.monitor ? "connecting…" : "not monitoring", listening: "monitoring",
                    talking: "TRANSMITTING",
                    busy: emergencyHeard ? "EMERGENCY on the floor — you hear it" : "BUSY — floor held by another talker",
                    requesting: "requesting floor…" };
    const stateEl = $(".state", el);
    if (!stateEl.textContent.startsWith("PTT refused") || info.me === "talking")
      stateEl.textContent = (info.may_talk ? "" : "monitor only · ") + (words[info.me] || info.me);
  }
  showToolbar();
}

function select(tg) {
  selected = tg;
  for (const [name, t] of tiles) { t.el.classList.toggle("selected", name === tg); applyVolume(t); }
}

// Cross-border links: state, round trip, what is shared; Cut / Restore with `links`.
function renderLinks(links) {
  const key = JSON.stringify(links);
  if (renderLinks.key === key) return;
  renderLinks.key = key;
  const box = $("#links");
  box.replaceChildren(...links.map((l) => {
    const el = document.createElement("article");
    el.className = `link-tile ${l.state}`; el.dataset.link = l.name;
    el.setAttribute("role", "group"); el.setAttribute("aria-label", `Link ${l.name}`);
    const h = document.createElement("h2");
    const state = document.createElement("span");
    state.className = "link-state"; state.textContent = l.state.replace(/_/g, " ");
    h.append(`Link ${l.name}`, state);
    const info = document.createElement("p");
    info.className = "link-rtt"; info.textContent = l.rtt_ms === null ? "RTT —" : `RTT ${l.rtt_ms} ms`;
    const list = document.createElement("ul");
    list.replaceChildren(...l.shares.map((x) => {
      const li = document.createElement("li");
      li.textContent = `${x.talkgroup} as “${x.as}”: ${x.state.replace(/_/g, " ")}`;
      return li;
    }));
    el.append(h, info, list);
    if (l.may_cut) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = l.cut_here ? "restore-button" : "cut-button";
      b.textContent = l.cut_here ? "Restore" : "Cut";
      b.setAttribute("aria-label", `${b.textContent} link ${l.name}`);
      b.addEventListener("click", () => {
        if (!l.cut_here && !confirm(`Cut link ${l.name}? No audio crosses until it is restored.`)) return;
        send({ type: l.cut_here ? "link_restore" : "link_cut", link: l.name });
      });
      el.append(b);
    }
    return el;
  }));
}

// --- talk history, selection, all-call, patching, audio routing ----------------------------

// The last overs; where the talkgroup keeps instant recall, each over's clip has ▶.
function renderHistory(t, overs, recall) {
  const key = JSON.stringify([overs, recall]);
  if (t.historyKey === key) return;
  t.historyKey = key;
  const tg = t.el.dataset.talkgroup;
  const list = $(".history", t.el);
  list.replaceChildren(...overs.map((o) => {
    const li = document.createElement("li");
    const at = new Date(o.start * 1000).toLocaleTimeString([], { hour12: false });
    li.textContent = `${at} ${o.emergency ? "⚠ " : ""}${o.who}${o.agency ? " (" + o.agency + ")" : ""} · ${o.seconds.toFixed(1)} s `;
    if (o.emergency) li.className = "emergency-over";
    const clip = recall.find(c => Math.abs(c.start - o.start) < 1.5);
    if (clip) {
      const play = document.createElement("button");
      play.type = "button"; play.className = "replay"; play.textContent = "▶";
      play.setAttribute("aria-label", `Replay the over of ${o.who} at ${at}`);
      play.addEventListener("click", (e) => { e.stopPropagation(); replay(tg, clip.id); });
      li.appendChild(play);
    }
    return li;
  }));
}

async function replay(tg, clip) {
  const r = await fetch(`/api/console/recall?talkgroup=${encodeURIComponent(tg)}&clip=${clip}`,
                        { credentials: "same-origin" });
  if (!r.ok) { $(".state", tiles.get(tg).el).textContent = "that over is no longer kept"; return; }
  const blob = await r.blob();
  diag.log.push({ t: Date.now(), recall: tg, clip, bytes: blob.size });
  const player = new Audio(URL.createObjectURL(blob));
  player.onended = () => URL.revokeObjectURL(player.src);
  player.play().catch(() => {});
}

function picked() { return [...tiles].filter(([, t]) => $(".pick-toggle", t.el).checked).map(([n]) => n); }

function showToolbar() {
  const names = picked();
  const patchable = names.filter(n => tiles.get(n).info.may_patch);
  $("#patch-selected").hidden = !(patchable.length >= 2 && patchable.length === names.length);
  $("#allcall").disabled = names.length === 0;
}

(() => {
  const allcall = $("#allcall");
  allcall.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    try { allcall.setPointerCapture(e.pointerId); } catch { /* synthetic pointer */ }
    const names = picked();
    if (!names.length) { $("#allcall-status").textContent = "Select talkgroups first"; return; }
    allcall.setAttribute("aria-pressed", "true");
    pttPressAll(names);
  });
  const up = (e) => { e.preventDefault(); allcall.setAttribute("aria-pressed", "false"); pttRelease(); };
  for (const kind of ["pointerup", "pointercancel", "lostpointercapture"]) allcall.addEventListener(kind, up);
  allcall.addEventListener("contextmenu", (e) => e.preventDefault());
  $("#patch-selected").addEventListener("click", () => send({ type: "patch", talkgroups: picked() }));
  $("#mute-all").addEventListener("click", (e) => {
    const on = e.target.getAttribute("aria-pressed") !== "true";
    e.target.setAttribute("aria-pressed", String(on));
    for (const t of tiles.values()) applyVolume(t);
  });
  $("#louder").addEventListener("change", () => { for (const t of tiles.values()) applyVolume(t); });
})();

// Per-tile settings (volume, ear) are kept per operator in this browser: the next
// shift at this position gets its own, the same operator gets theirs back.
function tileSettings() {
  try { return JSON.parse(localStorage.getItem(`borderlink.tiles.${me && me.operator}`)) || {}; }
  catch { return {}; }
}

function saveTile(tg) {
  const t = tiles.get(tg);
  if (!t || !me) return;
  const all = tileSettings();
  all[tg] = { volume: Number($(".volume-slider", t.el).value), side: sideOf(t) };
  try { localStorage.setItem(`borderlink.tiles.${me.operator}`, JSON.stringify(all)); } catch { /* private mode */ }
}

function sideOf(t) { const r = $(".side input:checked", t.el); return r ? r.value : "both"; }

// Left / right routing happens at the gateway: the page asks for stereo Opus
// (stereo=1) and a talkgroup routed to one ear arrives with the other channel silent.
// The media element plays it as it is, so getStats audioLevel stays what is heard.
function withStereo(sdp) {
  const pt = (sdp.match(/^a=rtpmap:(\d+) opus\/48000\/2/mi) || [])[1];
  if (!pt) return sdp;
  if (!new RegExp(`^a=fmtp:${pt} `, "m").test(sdp))
    return sdp.replace(new RegExp(`^(a=rtpmap:${pt} .*\r?\n)`, "mi"), `$1a=fmtp:${pt} stereo=1;sprop-stereo=1\r\n`);
  return sdp.replace(new RegExp(`^(a=fmtp:${pt} .*?)(;stereo=1;sprop-stereo=1)?\r?$`, "m"),
                     `$1;stereo=1;sprop-stereo=1\r`);
}

// --- audio: one peer connection per monitored talkgroup ------------------------------------

async function join(tg) {
  const t = tiles.get(tg);
  if (!t || t.pc || !t.monitor) return;
  const pc = new RTCPeerConnection({ iceServers: [] });
  t.pc = pc;
  const transceiver = pc.addTransceiver("audio", { direction: mic ? "sendrecv" : "recvonly" });
  t.sender = mic ? transceiver.sender : null;
  pc.ontrack = (e) => attachAudio(t, e.streams[0] || new MediaStream([e.track]));
  pc.onconnectionstatechange = () => {
    if (t.pc !== pc) return;
    if (pc.connectionState === "failed") { hangUp(t); if (t.monitor) rejoin(tg); }
  };
  try {
    const offer = await pc.createOffer();
    await pc.setLocalDescription({ type: "offer", sdp: withStereo(offer.sdp) });
    await iceGathered(pc);
    const r = await api("/api/console/join", { console: consoleId, talkgroup: tg, type: "offer",
                                               sdp: pc.localDescription.sdp, side: sideOf(t) });
    if (!r.ok) throw new Error((r.data && r.data.error) || `join refused (${r.status})`);
    if (t.pc !== pc) return;
    await pc.setRemoteDescription({ type: r.data.type, sdp: withStereo(r.data.sdp) });
  } catch (err) {
    if (t.pc === pc) { hangUp(t); $(".state", t.el).textContent = `cannot join: ${err.message}`; if (t.monitor) rejoin(tg, 3000); }
  }
}

function rejoin(tg, delay = 1000) { setTimeout(() => { const t = tiles.get(tg); if (t && t.monitor && !t.pc && running) join(tg); }, delay); }

function iceGathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000);  // host candidates are enough on a dispatch LAN
  });
}

function attachAudio(t, stream) {
  // The media element itself plays the talkgroup: WebRTC then renders the track, so its
  // getStats audioLevel is what the dispatcher hears (played through Web Audio behind a
  // muted element, a working console would read as silent). Web Audio only measures.
  t.audio = new Audio(); t.audio.srcObject = stream; applyVolume(t); t.audio.play().catch(() => {});
  const source = audioCtx.createMediaStreamSource(stream);
  t.analyser = audioCtx.createAnalyser(); t.analyser.fftSize = 8192; t.analyser.smoothingTimeConstant = 0;
  source.connect(t.analyser);
  t.source = source;
}

// Each tile's own volume; "Mute all" silences every tile; "Selected louder" drops the
// others by 8 dB so the selected talkgroup stands out (as dispatch consoles do).
function applyVolume(t) {
  if (!t.audio) return;
  const own = Math.min(1, Math.max(0, Number($(".volume-slider", t.el).value)));
  const muted = $("#mute-all").getAttribute("aria-pressed") === "true";
  const duck = $("#louder").checked && t.el.dataset.talkgroup !== selected ? 0.4 : 1;
  t.audio.volume = muted ? 0 : own * duck;
}

function hangUp(t) {
  if (pttHeld && pttHeld.tgs.some(tg => tiles.get(tg) === t)) pttRelease();
  if (t.pc) t.pc.close();
  if (t.audio) t.audio.srcObject = null;
  if (t.source) t.source.disconnect();
  t.pc = t.sender = t.source = t.analyser = t.audio = null;
}

async function setMonitor(tg, on) {
  const t = tiles.get(tg);
  t.monitor = on;
  if (on) { join(tg); return; }
  hangUp(t);
  await api("/api/console/leave", { console: consoleId, talkgroup: tg }).catch(() => {});
}

// --- PTT ---------------------------------------------------------------------------------

// EMERG is guarded: it only calls after being held EMERGENCY_HOLD_MS (the button fills up
// meanwhile); let go earlier and nothing is sent.
function arm(tg) {
  const t = tiles.get(tg);
  if (!t || pttHeld || arming) return;
  const btn = $(".emergency", t.el);
  btn.classList.add("arming");
  arming = { tg, timer: setTimeout(() => { arming = null; btn.classList.remove("arming"); pttPress(tg, true); },
                                   EMERGENCY_HOLD_MS) };
}

function disarm() {
  if (!arming) return;
  clearTimeout(arming.timer);
  const t = tiles.get(arming.tg);
  if (t) $(".emergency", t.el).classList.remove("arming");
  arming = null;
}

// Emergency alarms: a banner (and a tone) until someone acknowledges.
function showAlarms() {
  const first = alarms[0];
  ui.alarm.classList.toggle("on", !!first);
  ui.alarmText.textContent = first
    ? `⚠ EMERGENCY on ${first.talkgroup} — ${first.who}` + (alarms.length > 1 ? ` (+${alarms.length - 1} more)` : "")
    : "";
  ui.alarmAck.disabled = !first;
  ui.alarmAck.dataset.alarm = first ? String(first.id) : "";
  if (first && !alarmTone && audioCtx) alarmTone = startAlarmTone();
  if (!first && alarmTone) { alarmTone(); alarmTone = null; }
  diag.alarms = alarms;
}

function startAlarmTone() {
  // Two-tone warble, quiet enough to talk over; stops when acknowledged.
  const osc = audioCtx.createOscillator(), gain = audioCtx.createGain();
  gain.gain.value = 0.08; osc.frequency.value = 1000;
  osc.connect(gain); gain.connect(audioCtx.destination); osc.start();
  const warble = setInterval(() => { osc.frequency.value = osc.frequency.value === 1000 ? 1400 : 1000; }, 250);
  return () => { clearInterval(warble); osc.stop(); gain.disconnect(); };
}

ui.alarmAck.addEventListener("click", () => {
  const id = Number(ui.alarmAck.dataset.alarm);
  if (id) send({ type: "ack", alarm: id });
});

// PTT on one talkgroup, or on several at once (all-call): each talkgroup's floor
// decides on its own, and the page says where the floor was refused.
function pttPress(tg, emergency = false) { pttPressAll([tg], emergency); }

function pttPressAll(names, emergency = false) {
  if (pttHeld || !names.length) return;
  const first = tiles.get(names[0]);
  if (!mic) { if (first) $(".state", first.el).textContent = micError || "no microphone"; return; }
  const ready = names.filter(tg => tiles.get(tg) && tiles.get(tg).pc);
  for (const tg of names.filter(n => !ready.includes(n)))
    if (tiles.get(tg)) $(".state", tiles.get(tg).el).textContent = "turn Monitor on to talk here";
  if (!ready.length) return;
  pttHeld = { tg: ready[0], tgs: ready, emergency, refused: {} };
  for (const tg of ready) {
    const t = tiles.get(tg);
    diag.log.push({ t: Date.now(), ptt: tg, on: true, emergency });
    $(".ptt", t.el).setAttribute("aria-pressed", "true");
    if (t.sender) t.sender.replaceTrack(mic);
    send({ type: "ptt", talkgroup: tg, on: true, emergency });
  }
  showAllCall();
}

function pttReleaseOne(tg, notify) {
  diag.log.push({ t: Date.now(), ptt: tg, on: false });
  if (notify) send({ type: "ptt", talkgroup: tg, on: false });
  const t = tiles.get(tg);
  if (!t) return;
  $(".ptt", t.el).setAttribute("aria-pressed", "false");
  if (t.sender) t.sender.replaceTrack(null);
}

function pttRelease(notify = true) {
  if (!pttHeld) return;
  const { tgs } = pttHeld;
  pttHeld = null;
  for (const tg of tgs) pttReleaseOne(tg, notify);
  showAllCall();
}

// The all-call line: where the floor was refused (busy, monitor only…) while held.
function showAllCall() {
  const line = $("#allcall-status");
  if (!pttHeld || pttHeld.tgs.length < 2) {
    if (!pttHeld) line.textContent = line.textContent.startsWith("All-call") ? "" : line.textContent;
    return;
  }
  const refused = Object.entries(pttHeld.refused).map(([tg, why]) => `${tg} (${why})`);
  for (const tg of pttHeld.tgs) {
    const t = tiles.get(tg);
    if (t && t.info.me === "busy" && !(tg in pttHeld.refused)) refused.push(`${tg} (busy)`);
  }
  line.textContent = `All-call on ${pttHeld.tgs.join(", ")}` +
    (refused.length ? ` — floor refused on ${refused.join(", ")}` : " — floor granted everywhere");
  diag.allcall = { tgs: pttHeld.tgs, refused };
}

const typing = (e) => e.target instanceof HTMLInputElement && e.target.type !== "checkbox" && e.target.type !== "range";
document.addEventListener("keydown", (e) => {
  if (ui.main.hidden || typing(e)) return;
  if (e.code === "Space") { e.preventDefault(); if (!e.repeat && selected) pttPress(selected); }
  else if (e.key === "m" || e.key === "M") {
    const t = tiles.get(selected); if (!t) return;
    const box = $(".monitor-toggle", t.el); box.checked = !box.checked; setMonitor(selected, box.checked);
  } else if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
    const names = [...tiles.keys()]; if (!names.length) return;
    const i = (names.indexOf(selected) + (e.key === "ArrowRight" ? 1 : names.length - 1)) % names.length;
    tiles.get(names[i]).el.focus();
  }
});
document.addEventListener("keyup", (e) => { if (e.code === "Space" && !typing(e)) { e.preventDefault(); pttRelease(); } });
window.addEventListener("blur", () => pttRelease());           // never leave a PTT stuck
document.addEventListener("visibilitychange", () => { if (document.hidden) pttRelease(); });

// What this console hears on a talkgroup, measured on the received track.
diag.measure = (tg) => {
  const t = tiles.get(tg);
  if (!t || !t.analyser) return null;
  const a = t.analyser, spec = new Float32Array(a.frequencyBinCount), wave = new Float32Array(a.fftSize);
  a.getFloatFrequencyData(spec); a.getFloatTimeDomainData(wave);
  let peak = 0;
  for (let i = 1; i < spec.length; i++) if (spec[i] > spec[peak]) peak = i;
  const rms = Math.sqrt(wave.reduce((s, x) => s + x * x, 0) / wave.length);
  return { peakHz: peak * audioCtx.sampleRate / a.fftSize, peakDb: spec[peak], rmsDbfs: 20 * Math.log10(Math.max(rms, 1e-9)) };
};
diag.tiles = tiles;

boot();
