// The tablet's home page stays live: which cameras are online (staff decide on Continue
// by it) and how today's sessions are doing. The cameras are drawn by agents.js.
let misses = 0;
async function refresh() {
  let ok = false;
  try {
    const a = await get('/api/agents');
    if (a.status === 401) { location.href = '/login'; return; }
    if (a.ok) {
      const list = await a.json();
      const box = document.getElementById('home-agents');
      if (list.length) box.replaceChildren(...list.map(x => agentCard(x)));
      setText(document.getElementById('online-count'), list.filter(x => x.online).length + ' online');
      ok = true;
    }
    const r = await get('/api/sessions');
    if (r.ok) {
      const shown = new Map([...document.querySelectorAll('tr[data-sid]')].map(tr => [tr.dataset.sid, tr]));
      let unseen = false;
      for (const s of await r.json()) {
        const tr = shown.get(s.id);
        if (!tr) { unseen = true; continue; }
        const pill = tr.querySelector('.pill'); pill.textContent = s.state; pill.className = 'pill ' + s.state;
      }
      // New rows need the booth's clock format: offered as a reload, never forced on a
      // half-typed form.
      document.getElementById('home-new').hidden = !unseen;
    }
  } catch (err) { /* a network blip, or no answer in time: the next round tries again */ }
  // Green dots from minutes ago must not pass for cameras online now.
  misses = ok ? 0 : misses + 1;
  const offline = misses >= 2;
  document.getElementById('offline').hidden = !offline;
  document.getElementById('home-agents').classList.toggle('stale', offline);
  document.getElementById('create').disabled = offline;
  setTimeout(refresh, 3000);
}
setTimeout(refresh, 3000);
