// The session page: polls the session and the cameras, draws progress and live poses.
const root = document.getElementById('session');
const sid = root.dataset.sid;
const stages = ['created','capturing','uploaded','training','rendering','delivered'];
let countdownShown = false;
let plotStep = null;
let clockOffset = 0;  // server clock minus this tablet's, from the last poll
function fmt(sec) { if (sec == null) return ''; sec = Math.max(0, Math.round(sec)); return sec >= 60 ? Math.floor(sec/60) + ' min ' + (sec%60) + ' s' : sec + ' s'; }
function render(v) {
  const st = document.getElementById('state'); st.textContent = v.state; st.className = 'pill ' + v.state;
  document.querySelectorAll('#stages div').forEach(d => { const i = +d.dataset.stage; d.className = i < v.stage_index ? 'done' : (i === v.stage_index ? 'now' : ''); if (i === v.stage_index) d.setAttribute('aria-current', 'step'); else d.removeAttribute('aria-current'); });
  const f = document.getElementById('failure'); f.hidden = v.state !== 'failed'; document.getElementById('failure-reason').textContent = v.failure_reason || '';
  const p = v.progress || {};
  if (v.server_time) clockOffset = v.server_time - Date.now() / 1000;
  if (v.state === 'capturing' && !countdownShown && p.capture_at) { countdownShown = true; runCountdown(p.capture_at); }
  const cap = document.getElementById('capture-status');
  if (v.takes && v.takes.length) cap.textContent = v.takes.map(t => `${t.camera_id}: ${t.frames_stored} frames uploaded` + (t.frame_count != null ? ` of ${t.frame_count}` : '') + (t.state === 'uploaded' ? ' ✓' : '')).join(' · ');
  const ts = document.getElementById('train-status');
  if (p.stage) {
    ts.textContent = `${p.stage}` + (p.step != null ? ` · step ${p.step}${p.total_steps ? ' / ' + p.total_steps : ''}` : '') + (p.eta_s != null ? ` · about ${fmt(p.eta_s)} left` : '') + (p.loss != null ? ` · L1 ${(+p.loss).toFixed(3)}` : '') + (p.message ? ` · ${p.message}` : '');
    if (p.total_steps) { const pct = Math.min(100, 100 * p.step / p.total_steps); document.getElementById('train-bar').style.width = pct + '%'; document.getElementById('train-progress').setAttribute('aria-valuenow', Math.round(pct)); }
    // A new plot per reported step, not per poll: no refetch (or flicker) while it is the same.
    if (p.step != null && p.step !== plotStep) {
      plotStep = p.step;
      const img = document.getElementById('plot');
      img.onload = () => img.style.display = 'block'; img.onerror = () => img.style.display = 'none';
      img.src = `/sessions/${sid}/plot.png?step=${p.step}`;
    }
  }
  if (v.state === 'delivered') document.getElementById('train-bar').style.width = '100%';
  if (v.video_url && !document.querySelector('#link a')) {
    const a = document.createElement('a'); a.href = v.video_url; a.target = '_blank'; a.rel = 'noopener'; a.textContent = 'Watch the video';
    const note = document.createElement('span'); note.className = 'muted'; note.textContent = " (the attendee's own link is in their email)";
    document.getElementById('link').replaceChildren(a, ' ', note);
  }
  const e = v.email_delivery; document.getElementById('email-state').textContent = e ? `Email to ${e.to_addr}: ${e.state}` + (e.last_error ? ` (${e.last_error})` : '') : '';
  // Start while created, Start again once failed (also when it fails while this page is open).
  const sf = document.getElementById('start-form');
  if (sf && !sf.dataset.sent) {
    const again = v.state === 'failed';
    sf.hidden = v.state !== 'created' && !again;
    sf.action = `/sessions/${sid}/${again ? 'again' : 'start'}`;
    document.getElementById('start').textContent = again ? 'Start again' : 'Start';
  }
  const rf = document.getElementById('resend-form'); if (rf) rf.hidden = v.state !== 'delivered';
  const stf = document.getElementById('stop-form'); if (stf && !stf.dataset.sent) stf.hidden = v.state !== 'capturing';
}
function runCountdown(atSec) {
  const el = document.getElementById('countdown'); el.hidden = false;
  const tick = () => { const left = Math.ceil(atSec - (Date.now()/1000 + clockOffset)); if (left > 0) { el.textContent = left; setTimeout(tick, 200); } else { el.textContent = 'Dance!'; setTimeout(() => el.hidden = true, 2500); } };
  tick();
}
const LIMBS = JSON.parse(root.dataset.limbs);
// Text from agents goes in as text, never as HTML (agents.js).
function renderAgents(list) {
  const box = document.getElementById('agents');
  box.replaceChildren(...list.map(x => agentCard(x, LIMBS)));
  if (!list.length) { const d = document.createElement('div'); d.className = 'agent offline'; d.textContent = 'no camera online'; box.append(d); }
}
let failures = 0;
async function poll() {
  let ok = false;
  try {
    const r = await fetch(`/api/sessions/${sid}`, {credentials: 'same-origin'});
    // Gone from under this page: deleted (maybe on another tablet), or started again.
    // The page's own URL knows which: it leads on to the new session, or home.
    if (r.status === 404) { location.href = `/sessions/${sid}`; return; }
    if (r.status === 401) { location.href = '/login'; return; }  // the login expired
    if (r.ok) { render(await r.json()); ok = true; }
    const a = await fetch('/api/agents', {credentials: 'same-origin'});
    if (a.ok) renderAgents(await a.json());
  } catch (err) { /* a network blip: try again */ }
  failures = ok ? 0 : failures + 1;
  // Stale numbers must not pass for live ones: say so after a few misses.
  document.getElementById('offline').hidden = failures < 3;
  setTimeout(poll, 1000);
}
poll();

// Deleting asks first; cancelling stops the submit before once.js disables the button.
document.querySelector('form[data-confirm]')?.addEventListener('submit', (event) => {
  if (!confirm(event.currentTarget.dataset.confirm)) event.preventDefault();
});
