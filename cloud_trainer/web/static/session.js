// The session page: polls the session and the cameras, draws progress and live poses.
const root = document.getElementById('session');
const sid = root.dataset.sid;
const stages = ['created','capturing','uploaded','training','rendering','delivered'];
let countdownShown = false;
let plotStep = null;
let clockOffset = 0;  // server clock minus this tablet's, from the last poll
let announced = null;  // what #announce last said (null before the first poll)
const TRAINER_QUIET_S = 90;  // several missed heartbeats
function fmt(sec) { if (sec == null) return ''; sec = Math.max(0, Math.round(sec)); return sec >= 60 ? Math.floor(sec/60) + ' min ' + (sec%60) + ' s' : sec + ' s'; }
function render(v) {
  const st = document.getElementById('state'); setText(st, v.state); st.className = 'pill ' + v.state;
  document.querySelectorAll('#stages div').forEach(d => { const i = +d.dataset.stage; d.className = i < v.stage_index ? 'done' : (i === v.stage_index ? (v.state === 'failed' ? 'failed' : 'now') : ''); if (i === v.stage_index) d.setAttribute('aria-current', 'step'); else d.removeAttribute('aria-current'); });
  // The reason first, then shown: the alert is read as it appears, and once.
  setText(document.getElementById('failure-reason'), v.failure_reason || '');
  document.getElementById('failure').hidden = v.state !== 'failed';
  const p = v.progress || {};
  announce(v, p);
  if (v.server_time) clockOffset = v.server_time - Date.now() / 1000;
  takeSeconds = v.take_s;
  if (v.state === 'capturing' && !countdownShown && p.capture_at) { countdownShown = true; runCountdown(p.capture_at); }
  const cap = document.getElementById('capture-status');
  if (v.takes && v.takes.length) setText(cap, v.takes.map(t => `${t.camera_id}: ${t.frames_stored} frames uploaded` + (t.frame_count != null ? ` of ${t.frame_count}` : '') + (t.state === 'uploaded' ? ' ✓' : '')).join(' · '));
  // The take is over but a camera's upload is not in: say which, and until when.
  const wait = document.getElementById('upload-wait');
  const now = Date.now() / 1000 + clockOffset;
  const ended = v.state === 'capturing' && p.capture_at && now > p.capture_at + v.take_s + 10;
  const done = new Set((v.takes || []).filter(t => t.state === 'uploaded').map(t => t.camera_id));
  const missing = (v.cameras || []).filter(c => !done.has(c));
  wait.hidden = !(ended && missing.length);
  if (!wait.hidden) {
    const until = v.upload_deadline_clock;  // the booth's clock, as the rest of the tablet
    setText(document.getElementById('upload-wait-text'), `Waiting for ${missing.join(', ')} to finish uploading. Check that camera's board and network.` + (until ? ` The booth gives up at ${until}.` : '') + (done.size ? ` Or go on with ${[...done].join(', ')}: the attendee need not dance again.` : ' Or delete the session and start again.'));
    document.getElementById('go-on-form').hidden = !done.size;
  }
  const ts = document.getElementById('train-status');
  if (v.state === 'uploaded') setText(ts, 'Waiting for a trainer to pick it up.');
  else if (v.state === 'failed') { setText(ts, 'Stopped: the reason is above.'); document.getElementById('train-bar').style.width = '0%'; }
  else if (v.state === 'delivered') setText(ts, 'Done.');
  else if (p.stage === 'rendering') setText(ts, 'Rendering the video' + (p.eta_s != null ? ` · about ${fmt(p.eta_s)} left` : '') + '.');
  else if (p.stage && v.state !== 'failed') {
    setText(ts, `${p.stage}` + (p.step != null ? ` · step ${p.step}${p.total_steps ? ' / ' + p.total_steps : ''}` : '') + (p.eta_s != null ? ` · about ${fmt(p.eta_s)} left` : '') + (p.loss != null ? ` · loss ${(+p.loss).toFixed(3)}` : '') + (p.message ? ` · ${p.message}` : ''));
  }
  // A trainer beats every few seconds: a long silence means it stopped (killed, its
  // machine gone), and the step and time left above are frozen, not slow.
  if (v.trainer_quiet_s != null && v.trainer_quiet_s > TRAINER_QUIET_S && (v.state === 'training' || v.state === 'rendering')) {
    setText(ts, `No word from its trainer for ${Math.floor(v.trainer_quiet_s / 60)} min: it may have stopped. Another trainer takes the job over by itself, from its last checkpoint; if nothing moves within 10 minutes, call the tech.`);
  }
  if (p.stage) {
    if (p.total_steps && p.stage !== 'rendering') { const pct = Math.min(100, 100 * p.step / p.total_steps); document.getElementById('train-bar').style.width = pct + '%'; document.getElementById('train-progress').setAttribute('aria-valuenow', Math.round(pct)); }
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
    const a = document.createElement('a'); a.href = v.video_url; a.target = '_blank'; a.rel = 'noopener'; a.className = 'button secondary'; a.textContent = 'Watch the video';
    const note = document.createElement('span'); note.className = 'muted'; note.textContent = " (the attendee's own link is in their email)";
    document.getElementById('link').replaceChildren(a, ' ', note);
  }
  const e = v.email_delivery; const es = document.getElementById('email-state');
  const bad = e && (e.state === 'bounced' || e.state === 'failed');
  // A bounce is the address; anything else (the relay down, or refusing the booth) is
  // not, and staff must not be sent to correct an address that is fine.
  const why = e && e.last_error ? ` (${e.last_error})` : '';
  const text = !e ? ''
    : e.state === 'bounced' ? `The email to ${e.to_addr} bounced${why}. Correct the address below and press Resend.`
    : e.state === 'failed' ? `The email to ${e.to_addr} could not be sent${why}. Once the booth's mail works again, press Resend.`
    : e.state === 'pending' && e.last_error ? `Email to ${e.to_addr}: not sent yet, retrying${why}.`
    : `Email to ${e.to_addr}: ${e.state}`;
  // The role before the words, so a bounce is alerted as its words arrive; and neither
  // set again while unchanged (each poll would otherwise re-read, or re-alert, it).
  es.className = bad ? 'error' : 'muted';
  if (es.getAttribute('role') !== (bad ? 'alert' : 'status')) es.setAttribute('role', bad ? 'alert' : 'status');
  setText(es, text);
  // Start while created, Start again once failed (also when it fails while this page is open).
  const sf = document.getElementById('start-form');
  if (sf && !sf.dataset.sent) {
    const again = v.state === 'failed';
    sf.hidden = v.state !== 'created' && !again;
    sf.action = `/sessions/${sid}/${again ? 'again' : 'start'}`;
    document.getElementById('start').textContent = again ? 'Start again' : 'Start';
  }
  const rf = document.getElementById('resend-form'); if (rf) rf.hidden = v.state !== 'delivered';
  // "Dance!", then the seconds of the take left.
  if (v.state !== 'capturing') document.getElementById('countdown').hidden = true;
  // Stop only while the cameras film: once the take is over (uploads awaited) it would
  // do nothing.
  const filming = v.state === 'capturing' && !(p.capture_at && now > p.capture_at + v.take_s);
  const stf = document.getElementById('stop-form'); if (stf && !stf.dataset.sent) stf.hidden = !filming;
}
let takeSeconds = null;
// A change of state, or of stage while training, is said once. Not the step, ETA or loss
// of every poll, and not on the first poll: the page already shows the state it opened in.
function announce(v, p) {
  const text = `Session ${v.state}` + (v.state === 'training' && p.stage && p.stage !== 'training' ? `: ${p.stage}` : '') + '.';
  if (announced !== null && text !== announced) setText(document.getElementById('announce'), text);
  announced = text;
}
// Ticks every 200 ms so the digits turn on time, but writes (and so is spoken) only when
// the words change: 3, 2, 1, Dance! once each. The take's seconds left are in a part
// screen readers skip (session.html).
function runCountdown(atSec) {
  const el = document.getElementById('countdown'); el.hidden = false;
  const say = document.getElementById('countdown-say'), rest = document.getElementById('countdown-rest');
  const tick = () => {
    const now = Date.now() / 1000 + clockOffset;
    const left = Math.ceil(atSec - now);
    if (left > 0) { setText(say, String(left)); setTimeout(tick, 200); return; }
    setText(say, 'Dance!');
    const more = takeSeconds == null ? 0 : Math.ceil(atSec + takeSeconds - now);
    if (more > 0 && !el.hidden) { setText(rest, ` ${more} s`); setTimeout(tick, 200); }
    else { setText(rest, ''); setTimeout(() => el.hidden = true, 1500); }
  };
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
    const r = await get(`/api/sessions/${sid}`);
    // Gone from under this page: deleted (maybe on another tablet), or started again.
    // The page's own URL knows which: it leads on to the new session, or home.
    if (r.status === 404) { location.href = `/sessions/${sid}`; return; }
    if (r.status === 401) { location.href = '/login'; return; }  // the login expired
    if (r.ok) { render(await r.json()); ok = true; }
    const a = await get('/api/agents');
    if (a.ok) renderAgents(await a.json());
  } catch (err) { /* a network blip, or no answer in time: try again */ }
  failures = ok ? 0 : failures + 1;
  // Stale numbers must not pass for live ones: say so after a few misses, and do not
  // offer buttons whose press would only reach the browser's own error page.
  const offline = failures >= 3;
  document.getElementById('offline').hidden = !offline;
  for (const id of ['start', 'stop', 'resend']) { const b = document.getElementById(id); if (b && !b.closest('form').dataset.sent) b.disabled = offline; }
  setTimeout(poll, 1000);
}
poll();

// Deleting asks first; cancelling stops the submit before once.js disables the button.
document.querySelector('form[data-confirm]')?.addEventListener('submit', (event) => {
  if (!confirm(event.currentTarget.dataset.confirm)) event.preventDefault();
});
