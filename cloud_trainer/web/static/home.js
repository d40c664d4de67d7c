// The tablet's home page stays live: which cameras are online (staff decide on Continue
// by it) and how today's sessions are doing. The cameras are drawn by agents.js.
async function refresh() {
  try {
    const a = await fetch('/api/agents', {credentials: 'same-origin'});
    if (a.status === 401) { location.href = '/login'; return; }
    if (a.ok) {
      const list = await a.json();
      const box = document.getElementById('home-agents');
      if (list.length) box.replaceChildren(...list.map(x => agentCard(x)));
      document.getElementById('online-count').textContent = list.filter(x => x.online).length + ' online';
    }
    const r = await fetch('/api/sessions', {credentials: 'same-origin'});
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
  } catch (err) { /* a network blip: the next round tries again */ }
  setTimeout(refresh, 3000);
}
setTimeout(refresh, 3000);
