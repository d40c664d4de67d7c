// What the two live pages (home and session) share. One camera as the tablet shows it: its state,
// rate, drops, upload and error as text (never as HTML: agents' text is theirs), its
// warnings, and with ``limbs`` (the skeleton's bones) its newest pose.
const SVG = 'http://www.w3.org/2000/svg';
// A poll of the two live pages (home and session). A server that accepts the connection
// and never answers must count as gone too: each poll gives up after 4 s.
function get(url) { return fetch(url, {credentials: 'same-origin', signal: AbortSignal.timeout(4000)}); }
// Screen readers speak a live region on every write, even of the same words: the polls
// write only what changed, so a status is said once, not every second.
function setText(el, text) { if (el.textContent !== text) el.textContent = text; }
function agentCard(x, limbs) {
  const d = document.createElement('div'); d.className = 'agent ' + (x.online ? 'online' : 'offline'); d.dataset.camera = x.camera_id;
  const line = document.createElement('span');
  line.textContent = [x.camera_id, x.state, x.fps ? Math.round(x.fps) + ' fps' : '', x.capture_dropped ? 'drops ' + x.capture_dropped : '', x.upload_behind ? 'upload behind' : '', x.error].filter(Boolean).join(' · ');
  d.append(line);
  for (const w of x.warnings || []) { const p = document.createElement('div'); p.className = 'warn'; p.textContent = w; d.append(p); }
  if (x.live_pose && limbs) d.append(poseFigure(x.live_pose, limbs));
  return d;
}
// The camera's newest pose, as the board tracks it: staff see at once whether the
// dancer is in frame and followed.
function poseFigure(kp, limbs) {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', '0 0 160 120'); svg.setAttribute('class', 'pose'); svg.setAttribute('role', 'img'); svg.setAttribute('aria-label', 'live pose');
  for (const [a, b] of limbs) {
    const p = kp[a], q = kp[b];
    if (!p || !q || !(p[2] > 0) || !(q[2] > 0)) continue;
    const l = document.createElementNS(SVG, 'line');
    l.setAttribute('x1', p[0] * 160); l.setAttribute('y1', p[1] * 120); l.setAttribute('x2', q[0] * 160); l.setAttribute('y2', q[1] * 120);
    svg.append(l);
  }
  return svg;
}
